set -eu
create_bare "$1"
