set -eu
remove_staging "$1"
