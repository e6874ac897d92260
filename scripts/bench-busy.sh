#!/usr/bin/env bash
# Read-only window of a big, busy repository (issue 11, item 4):
#
#   scripts/bench-busy.sh [--size 5G] [--loose N] [--refs N] [--runs 5]
#                         [--repack-during-precopy both|yes|no] [--repack-delay 1]
#                         [--pushes] [--cache DIR] [--work DIR [--keep-trees]]
#                         [--bench [--out bench/RESULTS.md]]
#
# Makes (or reuses from --cache) a `mkfixture busy` repository: a packed history plus many loose
# objects and refs (defaults scale with --size: 5G gives 200000 loose objects and 100000 refs).
# Then, per variant and run, in a fresh world (registry, shard roots A and B, B's shardrecv on
# 127.0.0.1): copies the fixture into A (cp --reflink=auto -a, sync), runs `shardmove migrate
# --json`, and with `yes` starts `git repack -a -d` on A's copy --repack-delay seconds after
# migrate starts, so it runs during the pre-copy rounds (and, if it lasts longer, into the
# window: the report says so). --pushes adds a client pushing a small commit to A every 0.5 s
# during the migration (refused once frozen). Each run's read-only window is read from
# `shardmove migrate status --json` (readonly_seconds), the per-step times and bytes from
# migrate's progress lines; B's refs are checked equal to A's. Prints per-run figures and the
# median/max per variant; with --bench writes the section "Busy repository window (issue 11)"
# of bench/RESULTS.md. Nothing leaves 127.0.0.1; the fixture cache is kept for later runs.
# --keep-trees (with --work) keeps the last run's copies of the repository on A and B (2 x the
# fixture's size), to time git on them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

size=5G
loose=""
refs=""
runs=5
variants=both
repack_delay=1
pushes=0
cache=/tmp/shardmove-busy-cache
keep=""
keep_trees=0
bench=0
out=bench/RESULTS.md
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --loose) loose=$2; shift 2 ;;
    --refs) refs=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --repack-during-precopy) variants=$2; shift 2 ;;
    --repack-delay) repack_delay=$2; shift 2 ;;
    --pushes) pushes=1; shift ;;
    --cache) cache=$2; shift 2 ;;
    --work) keep=$2; shift 2 ;;
    --keep-trees) keep_trees=1; shift ;;
    --bench) bench=1; shift ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$variants" in
  both) variant_list="no yes" ;;
  yes|no) variant_list=$variants ;;
  *) echo "--repack-during-precopy: both, yes or no (not $variants)" >&2; exit 2 ;;
esac
[ "$runs" -ge 1 ] 2>/dev/null || { echo "--runs: a positive number (not $runs)" >&2; exit 2; }
if [ "$keep_trees" = 1 ] && [ -z "$keep" ]; then echo "--keep-trees needs --work DIR" >&2; exit 2; fi

scripts/install-deps.sh >/dev/null
nice -n 10 cargo build --release -q --workspace
bin=$PWD/target/release

# --- the fixture, made once per parameters ------------------------------------------------------
# The same formulas as fixtures::busy::default_loose/default_refs, so the cache key names the
# real counts whether or not they were given.
size_bytes=$(numfmt --from=iec "$size")
five_gib=$((5 << 30))
[ -n "$loose" ] || loose=$((size_bytes * 200000 / five_gib))
[ -n "$refs" ] || refs=$((size_bytes * 100000 / five_gib))
mkdir -p "$cache"
fixture=$cache/busy-$size-l$loose-r$refs-s1
if [ ! -s "$fixture.json" ] || [ ! -d "$fixture" ]; then
  rm -rf "$fixture" "$fixture.json"
  echo "generating busy fixture ($size, $loose loose objects, $refs refs) in $fixture..." >&2
  t0=$(date +%s.%N)
  "$bin/mkfixture" busy --size "$size" --loose "$loose" --refs "$refs" --out "$fixture" --json > "$fixture.json.tmp"
  sync
  mv "$fixture.json.tmp" "$fixture.json"
  echo "generated in $(echo "$(date +%s.%N) - $t0" | bc -l | xargs printf %.0f) s" >&2
else
  echo "reusing $fixture" >&2
fi

if [ -n "$keep" ]; then
  mkdir -p "$keep"
  work=$(cd "$keep" && pwd)
else
  work=$(mktemp -d /var/tmp/bench-busy.XXXXXX)
fi
recv_pid=""
repack_pid=""
pusher_pid=""
stop_bg() {
  local pid
  for pid in $pusher_pid $repack_pid $recv_pid; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pusher_pid=""; repack_pid=""; recv_pid=""
}
cleanup() {
  stop_bg
  if [ -z "$keep" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
now_ms() { date +%s%3N; }
# shellcheck source=lib/world.sh
. scripts/lib/world.sh

"$bin/shardrecv" keygen --out "$work/recv.key" > "$work/recv.fp" 2>/dev/null
"$bin/shardsend" keygen --out "$work/send.key" > "$work/allow" 2>/dev/null

# pusher REPO: push a new small commit to a branch of REPO every 0.5 s until killed; one line
# per attempt (ok/refused) in $run_dir/pushes.
pusher() {
  local repo=$1 client=$run_dir/client n=0
  git init -q "$client"
  while :; do
    n=$((n + 1))
    echo "$n" > "$client/f"
    git -C "$client" add f
    git -C "$client" -c user.name=client -c user.email=client@example.org commit -q -m "push $n"
    if git -C "$client" push -q "$repo" "HEAD:refs/heads/client/busy-bench" 2>/dev/null; then
      echo ok >> "$run_dir/pushes"
    else
      echo refused >> "$run_dir/pushes"
    fi
    sleep 0.5
  done
}

# One run: variant ($1: yes = repack during pre-copy), run number ($2). Appends one line to
# $work/results.tsv: variant run window_s precopy_s precopy_bytes final_s final_bytes
# verify_s repack_s repack_overlapped_window pushes_ok pushes_refused load1 precopy_rounds
# waited_for_git_s (a run that did not finish has its state and error as window_s).
run_one() {
  local variant=$1 n=$2
  run_dir=$work/$variant-$n
  rm -rf "$run_dir"
  # --keep-trees keeps only the last run's copies: any earlier run's in $work (this invocation's
  # or an earlier one's) go before this one starts, so they hold neither disk nor page cache.
  rm -rf "$work"/{yes,no}-*/{a,b}
  mkdir -p "$run_dir/a" "$run_dir/b"
  local sm=("$bin/shardmove" --db "$run_dir/registry.db")
  "$bin/shardrecv" serve --listen 127.0.0.1:0 --root "$run_dir/b" --identity "$work/recv.key" \
    --allow "$work/allow" > "$run_dir/recv.out" 2> "$run_dir/recv.log" &
  recv_pid=$!
  for _ in $(seq 200); do [ -s "$run_dir/recv.out" ] && break; sleep 0.05; done
  local recv_addr
  recv_addr=$(awk '{print $2}' "$run_dir/recv.out")
  [ -n "$recv_addr" ] || { echo "shardrecv did not start: $(cat "$run_dir/recv.log")" >&2; exit 1; }
  register_two_shards "$bin" "$run_dir/registry.db" "$run_dir/a" "$run_dir/b" "$recv_addr" "$work/recv.fp"
  "${sm[@]}" repo create --instance t busy >/dev/null
  # repo create made an empty `git init --bare`; the fixture takes its place.
  local repo=$run_dir/a/t/busy.git
  rm -rf "$repo"
  cp --reflink=auto -a "$fixture" "$repo"
  sync

  local repack_start=0 repack_end=0
  "${sm[@]}" migrate --instance t --from a --to b --no-restart-daemons \
    --identity "$work/send.key" --json > "$run_dir/migrate.json" 2> "$run_dir/migrate.log" &
  local migrate_pid=$!
  if [ "$pushes" = 1 ]; then
    pusher "$repo" > /dev/null 2>&1 &
    pusher_pid=$!
  fi
  if [ "$variant" = yes ]; then
    sleep "$repack_delay"
    repack_start=$(now_ms)
    ( git -C "$repo" repack -a -d -q > "$run_dir/repack.log" 2>&1; echo $? > "$run_dir/repack.rc"; now_ms > "$run_dir/repack.end" ) &
    repack_pid=$!
  fi
  local rc=0
  wait "$migrate_pid" || rc=$?
  if [ -n "$pusher_pid" ]; then kill "$pusher_pid" 2>/dev/null; wait "$pusher_pid" 2>/dev/null || true; pusher_pid=""; fi
  if [ -n "$repack_pid" ]; then
    wait "$repack_pid" || true
    repack_pid=""
    repack_end=$(cat "$run_dir/repack.end")
    [ "$(cat "$run_dir/repack.rc")" = 0 ] || echo "note: repack on A exited $(cat "$run_dir/repack.rc"): $(head -c 300 "$run_dir/repack.log")" >&2
  fi
  if [ "$rc" != 0 ]; then
    # A rolled-back move is a result too (a row saying so), not the end of the benchmark.
    echo "migrate exited $rc in $variant run $n:" >&2
    tail -5 "$run_dir/migrate.log" >&2
  fi
  "${sm[@]}" migrate status --json > "$run_dir/status.json"
  # B's copy has A's refs (A's repack changes no ref).
  if [ "$rc" = 0 ] && ! cmp -s <(git -C "$repo" for-each-ref) <(git -C "$run_dir/b/t/busy.git" for-each-ref); then
    echo "B's refs differ from A's after $variant run $n" >&2
    exit 1
  fi
  local ok=0 refused=0
  if [ -f "$run_dir/pushes" ]; then
    ok=$(grep -c '^ok' "$run_dir/pushes" || true)
    refused=$(grep -c '^refused' "$run_dir/pushes" || true)
  fi
  python3 - "$run_dir/status.json" "$run_dir/migrate.log" "$variant" "$n" "$repack_start" "$repack_end" \
    "$ok" "$refused" "$(cut -d' ' -f1 /proc/loadavg)" >> "$work/results.tsv" <<'PY'
import json, re, sys
status_path, log_path, variant, n, r0, r1, ok, refused, load = sys.argv[1:]
s = json.load(open(status_path))
if isinstance(s, list):
    s = s[0]
repo = s["repositories"][0]
done = repo["state"] == "done"
window = repo["readonly_seconds"] if done else None
# Progress lines: "HH:MM:SS.mmm t/busy: STATE in X s[, N bytes sent]".
steps = {}
rounds, waited = 0, 0.0
for line in open(log_path):
    m = re.search(r": (\w[\w-]*) in ([0-9.]+) s(?:, (\d+) bytes sent)?", line)
    if m:
        steps[m.group(1)] = (float(m.group(2)), int(m.group(3) or 0))
    if re.search(r": pre-copy round \d+:", line):
        rounds += 1
        w = re.search(r"\(waited ([0-9.]+) s for", line)
        if w:
            waited += float(w.group(1))
pre = steps.get("precopied", (0.0, 0))
final = steps.get("copied", (0.0, 0))
verify = steps.get("verified", (0.0, 0))
r0, r1 = int(r0), int(r1)
repack_s = (r1 - r0) / 1000 if r0 else 0.0
overlap = "-"
if r0:
    frozen, thawed = repo.get("frozen_at_ms"), repo.get("thawed_at_ms")
    overlap = "yes" if frozen is not None and r1 > frozen else "no"
shown = f"{window:.3f}" if done else f"{repo['state']}: {repo.get('error') or ''}"[:120].replace("|", "/")
print("\t".join(str(x) for x in [variant, n, shown, f"{pre[0]:.1f}", pre[1],
      f"{final[0]:.3f}", final[1], f"{verify[0]:.3f}", f"{repack_s:.1f}", overlap, ok, refused, load,
      rounds, f"{waited:.1f}"]))
PY
  stop_bg
  # Keep the last run's logs with --work, but not its two copies of the repository (unless
  # --keep-trees).
  [ "$keep_trees" = 1 ] || rm -rf "$run_dir/a" "$run_dir/b"
  tail -1 "$work/results.tsv" | awk -F'\t' '{printf "repack=%s run %s: window %s s (final pass %s s, %s bytes; verify %s s), pre-copy %s s %s bytes, repack %s s (into window: %s), load %s\n", $1, $2, $3, $6, $7, $8, $4, $5, $9, $10, $13}' >&2
}

: > "$work/results.tsv"
for variant in $variant_list; do
  for n in $(seq 1 "$runs"); do
    run_one "$variant" "$n"
  done
done

summary() {
  # variant -> "median max windows..."
  # (runs that did not finish count as failures, not windows)
  awk -F'\t' -v v="$1" '$1 == v && $3 ~ /^[0-9.]+$/ {print $3}' "$work/results.tsv" | sort -g |
    awk '{a[NR]=$1} END {if (NR == 0) {print "- -"; exit}; m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.3f %.3f\n", m, a[NR]}'
}
machine="$(nproc) cores, $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
report=$(python3 - "$fixture.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['disk_bytes']} bytes on disk ({r['pack_bytes']} in {r['packs']} pack(s)), "
      f"{r['objects']} objects of which {r['loose_objects']} loose, {r['refs']} refs of which "
      f"{r['loose_refs']} loose, {r['commits']} commits; generated in {r['elapsed_ms'] / 1000:.0f} s")
PY
)
table="| repack during pre-copy | run | read-only window (s) | final pass (s) | final pass bytes sent | verify in window (s) | pre-copy (s) | pre-copy rounds | waited for git (s) | pre-copy bytes sent | repack (s) | repack still running at freeze | pushes ok / refused | load1 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
$(awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s |\n", $1, $2, $3, $6, $7, $8, $4, $14, $15, $5, ($1 == "yes" ? $9 : "-"), $10, $11, $12, $13}' "$work/results.tsv")"
summary_lines=""
for variant in $variant_list; do
  read -r med max < <(summary "$variant")
  summary_lines="$summary_lines
- repack during pre-copy: **$variant**: median $med s, max $max s over $runs runs"
  failed=$(awk -F'\t' -v v="$variant" '$1 == v && $3 !~ /^[0-9.]+$/' "$work/results.tsv" | wc -l)
  [ "$failed" = 0 ] || summary_lines="$summary_lines ($failed of them did not finish: see the table)"
  echo "repack during pre-copy $variant: read-only window median $med s, max $max s ($runs runs, $failed not finished)"
done
args="--size $size --loose $loose --refs $refs --runs $runs --repack-during-precopy $variants"
[ "$repack_delay" = 1 ] || args="$args --repack-delay $repack_delay"
[ "$pushes" = 0 ] || args="$args --pushes"
section="## Busy repository window (issue 11)

- date: $(date -u +%Y-%m-%dT%H:%MZ)
- machine: $machine; load average at the end $(cut -d' ' -f1-3 /proc/loadavg)
- command: \`scripts/bench-busy.sh $args --bench\`
- fixture: \`mkfixture busy --size $size --loose $loose --refs $refs\`: $report
- each run: a fresh copy of the fixture on A (same disk as B), \`shardmove migrate\` to B over
  loopback; with repack, \`git repack -a -d\` on A starts ${repack_delay} s after migrate.
  The window is \`readonly_seconds\` of \`shardmove migrate status --json\`; the step times and
  bytes come from migrate's progress lines (\`copied\` = the final pass, inside the window).
$summary_lines

$table
"
echo
echo "$section"
if [ "$bench" = 1 ]; then
  # shellcheck source=scripts/lib/results.sh
  . scripts/lib/results.sh
  write_results_section "$out" "## Busy repository window (issue 11)" "$section"
fi
