set -eu
remove_staging "$1" "${2:-0}"
