#!/usr/bin/env bash
# Handshake flood benchmark (issue 15 item 3): an authorised transfer's throughput while
# `handshake-flood` sends unauthenticated handshakes at the receiver, against the same
# transfer without the flood, with the receiver's handshake limit on (the default) and off.
#
#   scripts/bench-flood.sh [--size 1G] [--runs 3] [--count 10000] [--seconds 10]
#                          [--bwlimit RATE] [--out bench/RESULTS.md] [--no-write]
#
# The transfer (SIZE of random data, 127.0.0.1 -> 127.0.0.1, destination on /dev/shm) runs
# while the flood (COUNT attempts over SECONDS from 127.0.0.2, a key nobody allowed) is under
# way; cells are interleaved (limit on/off x flood yes/no) in each of RUNS rounds, best
# throughput of the rounds kept. --bwlimit paces the transfer (a link slower than this
# machine's CPU, where the flood's own CPU cost does not decide). Nothing leaves 127.0.0.0/8.
set -euo pipefail
cd "$(dirname "$0")/.."

size=1G
runs=3
count=10000
seconds=10
bwlimit=""
out=bench/RESULTS.md
write=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --bwlimit) bwlimit=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-write) write=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh >/dev/null
cargo build --release -q -p transfer -p bench
bin=$PWD/target/release
work=$(mktemp -d /var/tmp/bench-flood.XXXXXX)
dst=$(mktemp -d /dev/shm/bench-flood-dst.XXXXXX)
recv_pid=""
cleanup() {
  [ -n "$recv_pid" ] && kill "$recv_pid" 2>/dev/null || true
  rm -rf "$work" "$dst"
}
trap cleanup EXIT

echo "making $size of random data..." >&2
mkdir -p "$work/src"
head -c "$(numfmt --from=iec "$size")" /dev/urandom > "$work/src/random.bin"
sync
"$bin/shardrecv" keygen --out "$work/recv.key" > "$work/recv.fp" 2>/dev/null
"$bin/shardsend" keygen --out "$work/send.key" > "$work/allow" 2>/dev/null
fp=$(cat "$work/recv.fp")

# one_cell LIMIT FLOOD ROUND: one transfer; appends "limit flood mb_per_s refused handshakes" to
# $work/cells.txt.
one_cell() {
  local limit=$1 flood=$2 round=$3 rate=20
  [ "$limit" = off ] && rate=0
  rm -rf "${dst:?}"/*
  "$bin/shardrecv" serve --listen 127.0.0.1:0 --root "$dst" --identity "$work/recv.key" \
    --allow "$work/allow" --handshake-rate "$rate" > "$work/recv.out" 2> "$work/recv.log" &
  recv_pid=$!
  for _ in $(seq 100); do [ -s "$work/recv.out" ] && break; sleep 0.05; done
  local addr flood_pid=""
  addr=$(awk '{print $2}' "$work/recv.out")
  if [ "$flood" = yes ]; then
    "$bin/handshake-flood" "$addr" --peer "$fp" --from 127.0.0.2 --count "$count" \
      --seconds "$seconds" > "$work/flood.json" &
    flood_pid=$!
    sleep 1
  fi
  local extra=()
  [ -n "$bwlimit" ] && extra=(--bwlimit "$bwlimit")
  "$bin/shardsend" "$work/src" "$addr" "r$round.git" --identity "$work/send.key" --peer "$fp" \
    --json --no-progress --compress off "${extra[@]}" > "$work/send.json"
  local refused=- handshakes=-
  if [ -n "$flood_pid" ]; then
    wait "$flood_pid"
    refused=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["refused"])' "$work/flood.json")
    handshakes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["handshake_failed"])' "$work/flood.json")
  fi
  kill "$recv_pid"; wait "$recv_pid" 2>/dev/null || true; recv_pid=""
  local mbps
  mbps=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mb_per_s"])' "$work/send.json")
  echo "$limit $flood $mbps $refused $handshakes" >> "$work/cells.txt"
  echo "round $round: limit $limit, flood $flood: $mbps MB/s (flood refused $refused, handshakes $handshakes)" >&2
}

: > "$work/cells.txt"
for round in $(seq "$runs"); do
  for limit in on off; do
    for flood in no yes; do
      one_cell "$limit" "$flood" "$round"
    done
  done
done

table=$(python3 - "$work/cells.txt" <<'PY'
import sys
best, flood = {}, {}
for line in open(sys.argv[1]):
    limit, fl, mbps, refused, hs = line.split()
    key = (limit, fl)
    if float(mbps) > best.get(key, (0,))[0]:
        best[key] = (float(mbps), refused, hs)
rows = []
for limit in ("on", "off"):
    quiet, loud = best[(limit, "no")], best[(limit, "yes")]
    rows.append("| %s | %.0f | %.0f | %.2f | %s | %s |" % (
        "on (20/s per address)" if limit == "on" else "off", quiet[0], loud[0],
        loud[0] / quiet[0], loud[1], loud[2]))
print("\n".join(rows))
PY
)
machine="$(nproc) cores, $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
section="## Handshake flood (issue 15): an authorised transfer under a flood of unauthenticated handshakes

- date: $(date -u +%Y-%m-%dT%H:%MZ)
- machine: $machine, load before: $(cut -d' ' -f1-3 /proc/loadavg)
- command: \`scripts/bench-flood.sh --size $size --runs $runs --count $count --seconds $seconds${bwlimit:+ --bwlimit $bwlimit}\`
- transfer: $size of random data, 127.0.0.1 to a shardrecv on 127.0.0.1 (destination /dev/shm),
  \`--compress off\`${bwlimit:+, paced at $bwlimit/s}; flood: \`handshake-flood\` from 127.0.0.2, $count attempts over
  $seconds s with a key nobody allowed, started 1 s before the transfer; best of $runs interleaved rounds.

| receiver's handshake limit | MB/s without flood | MB/s under flood | ratio | flood attempts refused before the handshake | flood handshakes run (and failed) |
|---|---|---|---|---|---|
$table
"
echo "$section"
if [ "$write" = 1 ]; then
  # shellcheck source=lib/results.sh
  . scripts/lib/results.sh
  write_results_section "$out" "## Handshake flood (issue 15)" "$section"
fi
