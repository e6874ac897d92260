#!/usr/bin/env bash
# Demo: move repositories between two local "shard hosts" with shardsend/shardrecv.
#
#   scripts/demo.sh [--keep]
#
# Builds the tools, makes two shard roots, keys for both hosts and a receiver daemon on
# loopback, generates a few repositories with mkfixture, moves each one from shard A to shard B
# (verified end to end, progress on a terminal), checks every copy with `git fsck` and equal refs,
# and cleans up (unless --keep). Needs no argument and no network beyond 127.0.0.1.
# `shardmove demo` (issue 6) will replace this with the full registry-driven migration.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1

scripts/install-deps.sh >/dev/null
echo "== building (release)"
cargo build --release -q -p transfer -p fixtures
bin=$PWD/target/release
work=$(mktemp -d /tmp/shardmove-demo.XXXXXX)
recv_pid=""
cleanup() {
  [ -n "$recv_pid" ] && kill "$recv_pid" 2>/dev/null || true
  if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "== two shard hosts: $work/shard-a (source) and $work/shard-b (target)"
mkdir -p "$work/shard-a" "$work/shard-b" "$work/keys"
recv_fp=$("$bin/shardrecv" keygen --out "$work/keys/shard-b.key" 2>/dev/null)
send_fp=$("$bin/shardsend" keygen --out "$work/keys/shard-a.key" 2>/dev/null)
echo "$send_fp  # shard-a" > "$work/keys/allow.txt"
echo "   shard-b key $recv_fp"
echo "   shard-a key $send_fp (in shard-b's allow-list)"

echo "== repositories on shard A"
"$bin/mkfixture" bare --size 20M --seed 1 --out "$work/shard-a/r1.git"
"$bin/mkfixture" loose --size 10M --seed 2 --out "$work/shard-a/r2.git"
"$bin/mkfixture" binary --size 30M --seed 3 --out "$work/shard-a/r3.git"

echo "== shardrecv on shard B"
"$bin/shardrecv" serve --listen 127.0.0.1:0 --root "$work/shard-b" --identity "$work/keys/shard-b.key" \
  --allow "$work/keys/allow.txt" > "$work/recv.out" 2> "$work/recv.log" &
recv_pid=$!
for _ in $(seq 100); do [ -s "$work/recv.out" ] && break; sleep 0.05; done
addr=$(awk '{print $2}' "$work/recv.out")
echo "   listening on $addr"

for r in r1.git r2.git r3.git; do
  echo "== moving $r"
  "$bin/shardsend" "$work/shard-a/$r" "$addr" "$r" --identity "$work/keys/shard-a.key" --peer "$recv_fp"
  git -C "$work/shard-b/$r" fsck --connectivity-only --no-progress
  a=$(git -C "$work/shard-a/$r" for-each-ref --format='%(objectname) %(refname)' | sha256sum)
  b=$(git -C "$work/shard-b/$r" for-each-ref --format='%(objectname) %(refname)' | sha256sum)
  [ "$a" = "$b" ] || { echo "refs differ for $r" >&2; exit 1; }
  echo "   $r verified on shard B: fsck clean, refs identical"
done
echo "== done: 3 repositories moved and verified"
