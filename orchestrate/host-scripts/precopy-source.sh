set -eu
# Before a pre-copy round, in one process: wait out git's gc/repack, then say the formats.
# Prints the formats ("sha1 files"), then "waited PROCESS" if it waited for one.
waited=$(wait_objects_idle "$1" "$2") || { status=$?; printf '%s\n' "$waited"; exit "$status"; }
git_formats "$1"
[ -z "$waited" ] || printf 'waited %s\n' "$waited"
