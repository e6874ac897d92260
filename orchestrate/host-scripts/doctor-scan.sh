set -eu
doctor_scan "$@"
