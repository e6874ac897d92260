set -eu
installed_root "$1" "$2"
