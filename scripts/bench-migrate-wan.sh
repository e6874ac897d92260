#!/usr/bin/env bash
# `shardmove migrate` over an emulated WAN link, with and without the senders' path memory:
#
#   scripts/bench-migrate-wan.sh [--repos 40] [--total 400M] [--rate 100M] [--delay 25ms]
#                                [--loss 0] [--runs 2] [--variants "cold warm"]
#                                [--work DIR] [-- MIGRATE ARGS...]
#
# Generates REPOS repositories (mkfixture, bare and loose, sizes weighted 1:2:4:8:16, ~TOTAL;
# kept in the work directory and reused by a later run with the same --repos and --total).
# Each run starts linkemu (RATE, one-way DELAY, LOSS per packet) and, inside it, a fresh world:
# shardrecv for device b1 in namespace B, the registry and both shard roots on this disk, the
# repositories pushed into A; then `shardmove migrate --parallel 4` (its defaults otherwise,
# plus MIGRATE ARGS) runs in namespace A. Variants, interleaved run after run:
# - cold: the senders' path memory cannot be written (its directory is a file), so every
#   transfer starts from ten packets, as before careful resume;
# - warm: the memory starts empty and fills as the migration goes (the default behaviour).
# Prints per run: migrate seconds, read-only window median and max, packets dropped at the
# link's queue. Needs root (namespaces); nothing leaves the two namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

repos=40
total=400M
rate=100M
delay=25ms
loss=0
runs=2
variants="cold warm"
work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --repos) repos=$2; shift 2 ;;
    --total) total=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --delay) delay=$2; shift 2 ;;
    --loss) loss=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --variants) variants=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
for v in $variants; do
  case "$v" in cold|warm) ;; *) echo "--variants: cold and/or warm, not $v" >&2; exit 2 ;; esac
done
if [ "$(id -u)" != 0 ]; then
  echo "bench-migrate-wan needs root (linkemu's network namespaces and TUN devices)" >&2
  exit 1
fi

scripts/install-deps.sh >/dev/null
cargo build --release -q --workspace
bin=$PWD/target/release
if [ -n "$work" ]; then
  mkdir -p "$work"
  work=$(cd "$work" && pwd)
else
  work=$(mktemp -d /var/tmp/bench-migrate-wan.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi

# shellcheck source=lib/world.sh
. scripts/lib/world.sh
make_mixed_fixtures "$bin" "$work/fixtures" "$repos" "$total"

# --- one run, inside linkemu (called back with --inside) ------------------------------------------
cat > "$work/run-inside.sh" <<'INSIDE'
#!/usr/bin/env bash
# $1 work, $2 bin, $3 repos, $4 variant, $5 scripts/lib, then migrate args; linkemu's
# variables in the env.
set -euo pipefail
work=$1 bin=$2 repos=$3 variant=$4 lib=$5; shift 5
# shellcheck source=/dev/null
. "$lib/world.sh"
w=$work/world
rm -rf "$w" "$work/cache-$variant"
mkdir -p "$w/a" "$w/b" "$work/cache-$variant/shardsend"
# cold: the path memory's directory is a file, so nothing is remembered.
[ "$variant" = cold ] && touch "$work/cache-$variant/shardsend/paths"
export XDG_CACHE_HOME=$work/cache-$variant
"$bin/shardrecv" keygen --out "$w/recv.key" > "$w/recv.fp" 2>/dev/null
"$bin/shardsend" keygen --out "$w/send.key" > "$w/allow" 2>/dev/null
ip netns exec "$LINKEMU_NS_B" "$bin/shardrecv" serve --listen "$LINKEMU_ADDR_B:7400" --root "$w/b" \
  --identity "$w/recv.key" --allow "$w/allow" > "$w/recv.out" 2> "$w/recv.log" &
recv=$!
trap 'kill $recv 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$w/recv.out" ] && break; sleep 0.05; done
register_two_shards "$bin" "$w/registry.db" "$w/a" "$w/b" "$LINKEMU_ADDR_B:7400" "$w/recv.fp"
create_fixture_repos "$bin" "$w/registry.db" "$work/fixtures" "$w/a" "$repos"
sync
sm=("$bin/shardmove" --db "$w/registry.db")
t0=$(date +%s.%N)
ip netns exec "$LINKEMU_NS_A" "${sm[@]}" migrate --instance t --from a --to b --no-restart-daemons \
  --parallel 4 --identity "$w/send.key" --json "$@" > "$w/migrate.json" 2> "$w/migrate.log"
t1=$(date +%s.%N)
python3 - "$w/migrate.json" "$(echo "$t1 - $t0" | bc -l)" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["state"] == "done", s["state"]
w = sorted(r["readonly_seconds"] for r in s["status"]["repositories"])
print("seconds %.1f window_median %.3f window_max %.3f" % (float(sys.argv[2]), w[len(w) // 2], w[-1]))
PY
INSIDE
chmod +x "$work/run-inside.sh"

echo "link: linkemu --rate $rate --delay $delay (RTT twice that) --loss $loss; $repos repositories, ~$total"
for r in $(seq "$runs"); do
  for v in $variants; do
    out=$("$bin/linkemu" --rate "$rate" --delay "$delay" --loss "$loss" -- \
      "$work/run-inside.sh" "$work" "$bin" "$repos" "$v" "$PWD/scripts/lib" "$@" 2>&1) || {
      echo "$v run $r failed:" >&2; echo "$out" >&2; exit 1; }
    line=$(echo "$out" | grep '^seconds ')
    drops=$(echo "$out" | awk '/linkemu a->b/ {for (i = 1; i <= NF; i++) if ($i == "queue") print $(i - 1)}')
    echo "run $r $v: $line dropped_at_queue $drops"
  done
done
