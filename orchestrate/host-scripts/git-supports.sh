set -eu
git_supports "$1" "$2"
