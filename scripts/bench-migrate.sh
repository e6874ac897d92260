#!/usr/bin/env bash
# Batch migration benchmark: `shardmove migrate` vs the manual runbook, in one run.
#
#   scripts/bench-migrate.sh [--repos 200] [--total 2G] [--parallel 4] [--out bench/RESULTS.md] [--no-write]
#                            [--work DIR] [--bin DIR] [--no-baseline]
#
# Generates REPOS repositories of mixed sizes adding up to about TOTAL (mkfixture, bare and
# loose), and sets up two identical worlds (registry, shard roots A and B). Then:
# - shardmove: `shardmove migrate --parallel P` (pre-copy live, short freeze, verified);
# - baseline: the runbook done by a script, one repository after the other: maintenance start,
#   tar on A, scp to B (a loopback sshd), untar, clusterize, thaw --promote --force,
#   maintenance stop.
# Reports total time and the read-only window per repository (median, max) for both, and writes
# them to bench/RESULTS.md. Both worlds live on the same disk; nothing leaves 127.0.0.1.
# --work DIR keeps the work directory (logs: DIR/migrate.log, DIR/migrate.json) and reuses the
# fixtures already generated there by an earlier run with the same --repos and --total.
# --bin DIR runs the binaries in DIR (another build, e.g. an older commit's target/release)
# instead of building this tree; --no-baseline skips the runbook (and writes no results): with
# both, two builds' `shardmove migrate` can be compared run after run on the same fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."

repos=200
total=2G
parallel=4
out=bench/RESULTS.md
write=1
keep=""
bin=""
baseline=1
while [ $# -gt 0 ]; do
  case "$1" in
    --repos) repos=$2; shift 2 ;;
    --total) total=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-write) write=0; shift ;;
    --work) keep=$2; shift 2 ;;
    --bin) bin=$(cd "$2" && pwd); shift 2 ;;
    --no-baseline) baseline=0; write=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh >/dev/null
if [ -z "$bin" ]; then
  cargo build --release -q --workspace
  bin=$PWD/target/release
fi
if [ -n "$keep" ]; then
  mkdir -p "$keep"
  work=$(cd "$keep" && pwd)
  rm -rf "$work/shardmove" "$work/baseline" "$work/ssh" "$work"/*.key "$work"/*.fp "$work/allow" "$work"/recv.*
else
  work=$(mktemp -d /var/tmp/bench-migrate.XXXXXX)
fi
sshd_pid=""
recv_pid=""
cleanup() {
  [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null || true
  [ -n "$recv_pid" ] && kill "$recv_pid" 2>/dev/null || true
  if [ -z "$keep" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
now() { date +%s.%N; }
# stats FILE: median and max of the numbers in FILE.
stats() { sort -g "$1" | awk '{a[NR]=$1} END {printf "%.3f %.3f\n", a[int((NR+1)/2)], a[NR]}'; }

# shellcheck source=lib/world.sh
. scripts/lib/world.sh

# --- fixtures: sizes weighted 1,2,4,8,16 (mixed small and large), summing to ~TOTAL -------------
make_mixed_fixtures "$bin" "$work/fixtures" "$repos" "$total"

# --- two identical worlds ---------------------------------------------------------------------
"$bin/shardrecv" keygen --out "$work/recv.key" > "$work/recv.fp" 2>/dev/null
"$bin/shardsend" keygen --out "$work/send.key" > "$work/allow" 2>/dev/null
"$bin/shardrecv" serve --listen 127.0.0.1:0 --root "$work/shardmove/b" --identity "$work/recv.key" \
  --allow "$work/allow" > "$work/recv.out" 2> "$work/recv.log" &
recv_pid=$!
for _ in $(seq 100); do [ -s "$work/recv.out" ] && break; sleep 0.05; done
recv_addr=$(awk '{print $2}' "$work/recv.out")

make_world() {
  local w=$work/$1
  mkdir -p "$w/a" "$w/b"
  register_two_shards "$bin" "$w/registry.db" "$w/a" "$w/b" "$recv_addr" "$work/recv.fp"
  create_fixture_repos "$bin" "$w/registry.db" "$work/fixtures" "$w/a" "$repos"
}
echo "setting up both worlds..." >&2
make_world shardmove
[ "$baseline" = 0 ] || make_world baseline

# --- shardmove migrate ------------------------------------------------------------------------
echo "shardmove migrate --parallel $parallel..." >&2
t0=$(now)
# No observation daemons in either world: the baseline restarts none, so neither does migrate.
"$bin/shardmove" --db "$work/shardmove/registry.db" migrate --instance t --from a --to b --no-restart-daemons \
  --parallel "$parallel" --identity "$work/send.key" --json > "$work/migrate.json" 2> "$work/migrate.log"
t1=$(now)
sm_total=$(echo "$t1 - $t0" | bc -l)
python3 - "$work/migrate.json" > "$work/sm-windows.txt" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["state"] == "done", s["state"]
for r in s["status"]["repositories"]:
    print(r["readonly_seconds"])
PY

if [ "$baseline" = 0 ]; then
  read -r sm_med sm_max < <(stats "$work/sm-windows.txt")
  echo "shardmove ($bin) total $(printf %.2f "$sm_total") s, window median $sm_med s, max $sm_max s"
  exit 0
fi

# --- baseline: the manual runbook, sequential ---------------------------------------------------
# shellcheck source=lib/sshd.sh
. scripts/lib/sshd.sh
start_loopback_sshd "$work/ssh"
echo "baseline runbook (maintenance, tar | scp | untar, clusterize, thaw, stop), sequential..." >&2
bsm=("$bin/shardmove" --db "$work/baseline/registry.db")
w=$work/baseline
t0=$(now)
"${bsm[@]}" binding add --instance t --service b >/dev/null
"${bsm[@]}" binding set-property --instance t --service a closed true >/dev/null
"${bsm[@]}" sync --instance t >/dev/null
: > "$work/base-windows.txt"
for i in $(seq 0 $((repos - 1))); do
  r0=$(now)
  "${bsm[@]}" repo maintenance "t/r$i" --start "moving to another shard" >/dev/null
  tar -C "$w/a" -cf "$work/r.tar" "t/r$i.git"
  scp -q "${ssh_opts[@]}" -P "$ssh_port" "$work/r.tar" root@127.0.0.1:"$work/incoming.tar"
  ssh "${ssh_opts[@]}" -p "$ssh_port" root@127.0.0.1 "mkdir -p '$w/b/t' && tar -C '$w/b' -xf '$work/incoming.tar' && rm '$work/incoming.tar'"
  "${bsm[@]}" repo clusterize "t/r$i" --service b >/dev/null
  "${bsm[@]}" repo thaw "t/r$i" --promote b1 --force >/dev/null
  "${bsm[@]}" repo maintenance "t/r$i" --stop >/dev/null
  r1=$(now)
  echo "$r1 - $r0" | bc -l >> "$work/base-windows.txt"
done
t1=$(now)
base_total=$(echo "$t1 - $t0" | bc -l)

read -r sm_med sm_max < <(stats "$work/sm-windows.txt")
read -r base_med base_max < <(stats "$work/base-windows.txt")
bytes=$(du -sb "$work/fixtures" | cut -f1)
machine="$(nproc) cores, $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
section="## Batch migration (issue 6): shardmove migrate vs the manual runbook

- date: $(date -u +%Y-%m-%dT%H:%MZ)
- machine: $machine
- command: \`scripts/bench-migrate.sh --repos $repos --total $total --parallel $parallel\`
- $repos repositories (bare and loose, sizes weighted 1:2:4:8:16), $bytes bytes of repositories on disk;
  both worlds on the same disk; B's copies verified by shardmove (full \`fsck --connectivity-only\`
  of the pre-copy, then refs equal to A's and git's connectivity check of what is new, in the
  window); the baseline verifies nothing.

| | total seconds | read-only window median (s) | read-only window max (s) |
|---|---|---|---|
| shardmove migrate --parallel $parallel | $(printf %.1f "$sm_total") | $sm_med | $sm_max |
| manual runbook (sequential) | $(printf %.1f "$base_total") | $base_med | $base_max |
| ratio (baseline / shardmove) | $(printf %.2f "$(echo "$base_total / $sm_total" | bc -l)") | $(printf %.1f "$(echo "$base_med / $sm_med" | bc -l)") | |
"
echo "$section"
if [ "$write" = 1 ]; then
  # shellcheck source=lib/results.sh
  . scripts/lib/results.sh
  write_results_section "$out" "## Batch migration (issue 6)" "$section"
fi

