set -eu
fsck_connectivity "$1"
