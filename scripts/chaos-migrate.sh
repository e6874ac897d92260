#!/usr/bin/env bash
# Randomized kill -9 soak of `shardmove migrate` (issue 10), not run in CI:
#
#   scripts/chaos-migrate.sh [--runs 3] [--repos 12] [--kills 10] [--size 16M] [--seed N] [--work DIR]
#
# Per run: REPOS repositories on shard A, a client pushing to wherever the registry says each
# lives, `migrate --parallel 2 --bwlimit 6M` killed with SIGKILL KILLS times (half just after a
# "frozen" line; every third time B's shardrecv too) and taken over each time, then driven to
# the end. Prints, per run, the invariant figures: acknowledged pushes lost, repositories not
# done or stuck read-only, doctor problems (disk vs registry), staging left, fsck failures, and
# the read-only windows (median, max, how many over 1 s). Exits non-zero if one is broken.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
cargo build --release -q --workspace
exec target/release/chaos-migrate --bin target/release "$@"
