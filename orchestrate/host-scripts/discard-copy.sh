set -eu
discard_copy "$1" "$2" "$3"
