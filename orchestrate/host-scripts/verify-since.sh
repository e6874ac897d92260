set -u
refs_and_connected_since "$1" "${2:-walk}"
