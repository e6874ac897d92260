set -eu
install_hook "$1" "$2"
