set -eu
remove_hook "$1"
