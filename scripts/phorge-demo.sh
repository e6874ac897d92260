#!/usr/bin/env bash
# Watch shardmove move a repository of a real Phorge cluster, and measure it.
#
#   scripts/phorge-demo.sh [--rounds N] [--steps agent|cli|both] [--bench] [--keep DIR]
#
# Stands up the lab kit of ../shared/phorge-lab (MariaDB, Phorge, a front and two repository
# devices, each in its own mount namespace; needs root), a shardrecv on each device (inside
# its namespace), records in Almanac how shardmove reaches each device (`shardmove phorge
# device`), starts a client pushing through the front, then moves rLAB from repos-a.lab to
# repos-b.lab and back, ROUNDS times, with `shardmove migrate --plane phorge`, printing what
# Phorge's registry says before and after each move. The kit's own `move.sh` is the manual
# runbook this replaces.
#
# --steps: how shardmove runs the runbook's registry steps: one PHP agent for the batch
# (agent, the default), `bin/repository` per step (cli), or both in turn (both).
# --bench: write the read-only windows (ours, and Phorge's own maintenance transactions) with
# the per-step breakdown to bench/RESULTS.md ("Phorge moves").
# --keep DIR: the lab and logs in DIR, left running (teardown: DIR/lab/teardown.sh --rm).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rounds=1
steps=agent
bench=0
keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --bench) bench=1; shift ;;
    --keep) keep=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case $steps in agent|cli) modes=$steps ;; both) modes="agent cli" ;; *) echo "--steps agent|cli|both" >&2; exit 2 ;; esac
kit=${SHARDMOVE_PHORGE_LAB:-$root/../shared/phorge-lab}
[ -x "$kit/setup.sh" ] || { echo "no Phorge lab kit at $kit (set SHARDMOVE_PHORGE_LAB)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "the Phorge lab needs root (mount namespaces)" >&2; exit 1; }

scripts/install-deps.sh >/dev/null
cargo build --release -q -p transfer -p orchestrate
bin=$root/target/release
if [ -n "$keep" ]; then mkdir -p "$keep"; work=$(cd "$keep" && pwd); else work=$(mktemp -d /tmp/phorge-demo.XXXXXX); fi
export LAB=$work/lab
export SHARDMOVE_DB=$work/shardmove.db
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -z "$keep" ]; then
    [ -x "$LAB/teardown.sh" ] && "$LAB/teardown.sh" --rm >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== the Phorge lab ($LAB)"
LAB_DB_PORT=$(free_port) LAB_HTTP_PORT=$(free_port) LAB_A_HTTP_PORT=$(free_port) LAB_B_HTTP_PORT=$(free_port) \
  "$kit/setup.sh" > "$work/setup.log" 2>&1 || { tail -20 "$work/setup.log"; exit 1; }
. "$LAB/lab.env"
front=http://127.0.0.1:$LAB_HTTP_PORT/
url=http://$LAB_ADMIN:$LAB_VCS_PASSWORD@127.0.0.1:$LAB_HTTP_PORT/source/lab.git
token=$LAB/admin.api-token

echo "== keys and a shardrecv on each device (inside its mount namespace)"
"$bin/shardsend" keygen --out "$work/send.key" > "$work/allow.txt" 2>/dev/null
for d in a b; do
  fp=$("$bin/shardrecv" keygen --out "$work/recv-$d.key" 2>/dev/null)
  "$LAB/tools/ondev.sh" "$d" "$bin/shardrecv" serve --listen 127.0.0.1:0 --root "$LAB/repo" \
    --identity "$work/recv-$d.key" --allow "$work/allow.txt" > "$work/recv-$d.out" 2> "$work/recv-$d.log" &
  pids+=($!)
  for _ in $(seq 1 50); do [ -s "$work/recv-$d.out" ] && break; sleep 0.1; done
  addr=$(awk '{print $2; exit}' "$work/recv-$d.out")
  "$bin/shardmove" phorge device "repo-$d.lab" --host "exec:$LAB/tools/ondev.sh $d" \
    --transfer "$addr" --fingerprint "$fp" --conduit "$front" --token-file "$token"
  echo "   repo-$d.lab: shardrecv $addr"
done

echo "== a client pushing through the front ($url)"
git clone -q "$url" "$work/client" 2>/dev/null
(
  cd "$work/client"
  n=0
  while :; do
    n=$((n + 1))
    git -c user.name=c -c user.email=c@example.invalid commit -q --allow-empty -m "c$n"
    if git push -q "$url" "HEAD:refs/heads/c$n" 2>/dev/null; then echo "ok c$n $(git rev-parse HEAD)"; else echo "refused c$n $(date +%s%3N)"; fi
  done > "$work/client.log"
) &
pids+=($!)

move() { # move FROM TO STEPS ROUND
  local from=$1 to=$2 mode=$3 round=$4
  local log=$work/move-$mode-$round-$to
  echo "== move rLAB: $from -> $to (registry steps: $mode)"
  "$LAB/tools/state.sh" | sed -n '1,12p'
  "$bin/shardmove" migrate --plane phorge --phorge-root "$LAB/phorge" --phorge-steps "$mode" \
    --conduit "$front" --token-file "$token" --from "$from" --to "$to" \
    --identity "$work/send.key" --json > "$log.json" 2> "$log.err" || { cat "$log.err"; exit 1; }
  grep -E "R1: |taking over" "$log.err" | sed 's/^/   /'
  "$LAB/tools/state.sh" | sed -n '1,12p'
  local phorge_s
  phorge_s=$("$LAB/tools/sql.sh" -N -e "SELECT MAX(t.dateCreated) - MIN(t.dateCreated) FROM (SELECT dateCreated FROM phorge_repository.repository_transaction WHERE transactionType = 'maintenance' ORDER BY id DESC LIMIT 2) t")
  python3 - "$log.json" "$log.err" "$mode" "$from" "$to" "$phorge_s" >> "$work/rows.tsv" <<'EOF'
import json, re, sys
summary = json.load(open(sys.argv[1]))
r = summary["status"]["repositories"][0]
steps = {}
for line in open(sys.argv[2]):
    m = re.search(r"R1: (\w+) in ([0-9.]+) s", line)
    if m:
        steps[m.group(1)] = float(m.group(2))
print("\t".join([sys.argv[3], sys.argv[4] + " -> " + sys.argv[5], "%.3f" % r["readonly_seconds"], sys.argv[6]]
                + ["%.3f" % steps.get(k, float("nan")) for k in ["frozen", "copied", "verified", "clusterized", "promoted", "done"]]))
EOF
  sleep 1
}

: > "$work/rows.tsv"
for round in $(seq 1 "$rounds"); do
  for mode in $modes; do
    move repos-a.lab repos-b.lab "$mode" "$round"
    move repos-b.lab repos-a.lab "$mode" "$round"
  done
done
kill "${pids[-1]}" 2>/dev/null || true
acked=$(grep -c '^ok' "$work/client.log" || true)
refused=$(grep -c '^refused' "$work/client.log" || true)
lost=0
while read -r _ branch sha; do
  got=$(git --git-dir="$LAB/dev-a/repo/1" rev-parse "refs/heads/$branch" 2>/dev/null || true)
  [ "$got" = "$sha" ] || lost=$((lost + 1))
done < <(grep '^ok' "$work/client.log")
git --git-dir="$LAB/dev-a/repo/1" fsck --no-progress
echo "== client: $acked pushes acknowledged ($lost lost), $refused refused during freezes"
echo
echo "steps  move  read-only(ours, s)  Phorge's maintenance txns (s)  frozen  copied  verified  clusterized  promoted(=read gap)  done"
column -t -s $'\t' "$work/rows.tsv"

if [ "$bench" = 1 ]; then
  . scripts/lib/results.sh
  machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
  section="## Phorge moves (issue 14)

Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $machine, with \`scripts/phorge-demo.sh --rounds $rounds --steps $steps --bench\`.
The Phorge lab kit (pinned Phorge, MariaDB, front + two devices in mount namespaces), rLAB moved
A -> B -> A each round with \`shardmove migrate --plane phorge\` while a client pushed through the
front ($acked pushes acknowledged, $lost lost, $refused refused inside freezes). Read-only window:
ours from just before the freeze to just after maintenance stop (ms); Phorge's: the seconds
between its own maintenance start and stop transactions (whole seconds). Step columns: seconds
per core state, \`promoted\` being the clusterize -> promote gap in which reads fail.

| registry steps | move | read-only (ours) s | Phorge's txns s | frozen | copied | verified | clusterized | promoted (read gap) | done |
|---|---|---|---|---|---|---|---|---|---|
$(awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1,$2,$3,$4,$5,$6,$7,$8,$9,$10}' "$work/rows.tsv")"
  write_results_section bench/RESULTS.md "## Phorge moves (issue 14)" "$section"
  echo "written to bench/RESULTS.md"
fi
[ "$lost" = 0 ] || { echo "acknowledged pushes lost" >&2; exit 1; }
