set -eu
# One process for both: one round trip (one ssh session) less in the read-only window.
install_hook "$1" "$2"
wait_idle "$1" "$3"
