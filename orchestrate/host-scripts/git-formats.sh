set -eu
git_formats "$1"
