set -eu
wait_idle "$1" "$2"
