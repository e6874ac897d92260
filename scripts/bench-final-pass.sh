#!/usr/bin/env bash
# The final pass of a big repository with shardsend alone (issue 11): what a migration's
# read-only window is mostly made of, measured without the orchestrator.
#
#   scripts/bench-final-pass.sh [--fixture DIR] [--rounds 3] [--work DIR] BIN_DIR [BIN_DIR...]
#
# Each BIN_DIR holds a shardsend and a shardrecv (e.g. target/release, or an older build kept
# aside). Per round and build, interleaved: a fresh shardrecv on 127.0.0.1 with a fresh root,
# `shardsend --git on --stage-only` of the fixture (the pre-copy), `sync`, then the installing
# `shardsend --resume` (the final pass, nothing left to send), timed by its own summary, with
# `RUST_LOG=transfer=debug` logs of both sides kept in --work. The receiver process is the same
# for both passes, as in a migration. Default fixture: the 5 GB `mkfixture busy` repository that
# scripts/bench-busy.sh keeps in /tmp/shardmove-busy-cache (make it with that script first).
# Prints one line per round and build, then the best per build. Nothing leaves 127.0.0.1.
set -euo pipefail

fixture=/tmp/shardmove-busy-cache/busy-5G-l200000-r100000-s1
rounds=3
work=
bins=()
while [ $# -gt 0 ]; do
  case $1 in
    --fixture) fixture=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) bins+=("$1"); shift ;;
  esac
done
[ ${#bins[@]} -ge 1 ] || { echo "give at least one BIN_DIR (see --help)" >&2; exit 2; }
[ -d "$fixture/objects" ] || { echo "no git directory at $fixture (scripts/bench-busy.sh makes it)" >&2; exit 2; }
[ "$rounds" -ge 1 ] 2>/dev/null || { echo "--rounds: a positive number (not $rounds)" >&2; exit 2; }
for b in "${bins[@]}"; do
  [ -x "$b/shardsend" ] && [ -x "$b/shardrecv" ] || { echo "$b has no shardsend and shardrecv" >&2; exit 2; }
done
if [ -z "$work" ]; then work=$(mktemp -d /var/tmp/bench-final-pass.XXXXXX); fi
mkdir -p "$work"
port=7499
recv_pid=
cleanup() {
  [ -n "$recv_pid" ] && kill "$recv_pid" 2>/dev/null || true
  rm -rf "$work/root" "$work/cache"
}
trap cleanup EXIT

declare -A best
for round in $(seq "$rounds"); do
  for b in "${bins[@]}"; do
    run="$work/r$round-$(echo "$b" | tr / _)"
    mkdir -p "$run"
    "$b/shardrecv" keygen --out "$run/recv.key" >/dev/null 2>&1
    "$b/shardsend" keygen --out "$run/send.key" >/dev/null 2>&1
    recv_fp=$("$b/shardrecv" fingerprint --identity "$run/recv.key" | awk '{print $NF}' | tail -1)
    "$b/shardsend" fingerprint --identity "$run/send.key" | awk '{print $NF}' | tail -1 >"$run/allow"
    rm -rf "$work/root" "$work/cache"; mkdir -p "$work/root"
    RUST_LOG=transfer=debug XDG_CACHE_HOME="$work/cache" "$b/shardrecv" serve --listen 127.0.0.1:$port \
      --root "$work/root" --identity "$run/recv.key" --allow "$run/allow" >/dev/null 2>"$run/recv.log" &
    recv_pid=$!
    sleep 0.5
    send=("$b/shardsend" "$fixture" 127.0.0.1:$port busy.git --identity "$run/send.key"
      --peer "$recv_fp" --json --no-progress --git on)
    XDG_CACHE_HOME="$work/cache" "${send[@]}" --stage-only >"$run/stage.json" 2>"$run/stage.log"
    sync
    RUST_LOG=transfer=debug XDG_CACHE_HOME="$work/cache" "${send[@]}" --resume >"$run/final.json" 2>"$run/final.log"
    secs=$(python3 -c "import json,sys; print('%.3f' % json.load(open(sys.argv[1]))['seconds'])" "$run/final.json")
    kill "$recv_pid"; wait "$recv_pid" 2>/dev/null || true; recv_pid=
    echo "round $round $b: final pass $secs s (load $(cut -d' ' -f1 /proc/loadavg))"
    if [ -z "${best[$b]:-}" ] || python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)" "$secs" "${best[$b]}"; then
      best[$b]=$secs
    fi
  done
done
for b in "${bins[@]}"; do echo "best $b: ${best[$b]} s"; done
echo "logs in $work"
