set -eu
# A path shardmove itself moved aside, past its retention.
case $1 in *.replaced-*|*.rolled-back-*) rm -rf -- "$1" ;; *) exit "$EX_MISSING" ;; esac
