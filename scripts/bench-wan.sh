#!/usr/bin/env bash
# WAN benchmark over linkemu: shardsend vs scp and rsync over ssh on emulated links, in one run.
#
#   scripts/bench-wan.sh [--rates "100M 1G"] [--rtts "2 50 150"] [--losses "0 0.1 1"] [--no-bursty]
#                        [--size 100M] [--timeout 300] [--tools "ss-off ss-auto scp rsync tcp"]
#                        [--congestion "bbr cubic"] [--queue 50ms] [--window 64M] [--offload on|off]
#                        [--fairness] [--auto-matrix] [--no-wan] [--smoke]
#                        [--out bench/RESULTS.md] [--no-write]
#
# WAN matrix (default): for each rate x RTT x random loss (%), plus one bursty-loss cell per rate
# and RTT 50 ms (Gilbert-Elliott 0.25%,25%: ~1% loss in bursts of 4), linkemu joins two fresh
# namespaces; sshd and shardrecv run in side B, every client in side A, and each tool copies a
# SIZE random file once: shardsend --compress off (ss-off) and auto (ss-auto), scp, rsync, and
# tcp: one bare kernel TCP socket (socat, no encryption, no verification), the link's own
# reference: what the host's TCP (BBR here) gets from that link with no application around it.
# Per cell: seconds, Mbit/s, % of link, ratio to scp, CPU seconds of each end (sender from
# /usr/bin/time; receiver from /proc/PID/stat of shardrecv or of the sshd master, whose
# cutime+cstime include the finished session). A copy slower than --timeout is cut and shown as
# "> T". --congestion LIST runs every shardsend tool once per controller (shardsend and
# shardrecv --congestion); empty (the default) uses the binaries' default. --window SIZE is
# given to both shardsend and shardrecv (bytes in flight per connection). --offload is
# linkemu's segmentation offload: on (the default) lets super-packets cross whole and reach the
# receiver coalesced, as NICs do (TSO/USO and GRO), off makes every wire packet one read and one
# write (per-packet costs that real hosts do not pay; the runs before 2026-11-28T18Z had it off).
# WAN_DST_DIR (default /dev/shm) holds the receiving side's copies.
# --fairness: one TCP flow (python, kernel TCP: BBR here) and shardsend share a 100 Mbit, 50 ms
#   link; each one's share while both run (shardsend with each --congestion, or the default).
# --auto-matrix: compression off vs zstd:1 vs zstd:3 vs auto on text-heavy (a worktree
#   fixture's checkout), pack (a bare fixture) and random data at 16 Mbit, 100 Mbit, 1 Gbit
#   (10 ms RTT) and loopback; prints auto's own reason, level and probes. Environment:
#   AUTO_LINKS, AUTO_TEXT_SIZE/AUTO_DATA_SIZE (below 1 Gbit; 60M/50M),
#   AUTO_FAST_TEXT_SIZE/AUTO_FAST_DATA_SIZE (1 Gbit, loopback; 1G/400M), AUTO_RUNS (1),
#   AUTO_DATA ("text pack.git random.bin") and AUTO_CHOICES ("off zstd:1 zstd:3 auto"; a
#   choice left out shows as "-"). Every run prints its seconds, wire bytes and (auto) reason
#   on stderr: `AUTO_LINKS=16M AUTO_DATA=text AUTO_CHOICES="zstd:3 auto" AUTO_RUNS=5 ... --no-write`
#   is the diagnosis of one cell; AUTO_TRACE=FILE also appends each auto run's measurement
#   windows (shardsend's debug log of `transfer::compress`) to FILE.
# --smoke: a tiny run to check the script (100M link, RTT 2 and 50 ms, loss 0 and 1%, 8M file);
#   it never writes RESULTS.md.
# Results: sections of bench/RESULTS.md (scripts/lib/results.sh), CSV under bench/out/, and the
# chart bench/wan-link-share.svg (% of link against loss; under bench/out/ with --no-write). Needs root; every address used
# exists only inside linkemu's namespaces (10.250.88.1/2) or on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

orig_args="$*"
rates="100M 1G"
rtts="2 50 150"
losses="0 0.1 1"
bursty=1
size=100M
timeout_s=300
tools="ss-off ss-auto scp rsync tcp"
congestions=""
queue=50ms
offload=on
window=""
do_wan=1
do_fair=0
do_auto=0
out=bench/RESULTS.md
write=1
smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) rates=$2; shift 2 ;;
    --rtts) rtts=$2; shift 2 ;;
    --losses) losses=$2; shift 2 ;;
    --no-bursty) bursty=0; shift ;;
    --size) size=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --congestion) congestions=$2; shift 2 ;;
    --queue) queue=$2; shift 2 ;;
    --offload) offload=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    --fairness) do_fair=1; shift ;;
    --auto-matrix) do_auto=1; shift ;;
    --no-wan) do_wan=0; shift ;;
    --smoke) smoke=1; rates=100M; rtts="2 50"; losses="0 1"; size=8M; timeout_s=60; shift ;;
    --out) out=$2; shift 2 ;;
    --no-write) write=0; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench-wan needs root (network namespaces)" >&2; exit 2; }

scripts/install-deps.sh >/dev/null
cargo build --release -q -p transfer -p fixtures -p bench
bin=$PWD/target/release
work=$(mktemp -d /var/tmp/bench-wan.XXXXXX)
dst_base=$(mktemp -d "${WAN_DST_DIR:-/dev/shm}/bench-wan-dst.XXXXXX")
mkdir -p bench/out
lemu_pid=""
sshd_pid=""
recv_pid=""
ns_a=""
ns_b=""
addr_b=""
cleanup() {
  stop_link
  rm -rf "$work" "$dst_base"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
now() { date +%s.%N; }
num2() { [ "$1" = - ] && { echo -; return; }; printf %.2f "$1" 2>/dev/null || echo "?"; }
pct0() { awk -v v="$1" 'BEGIN { if (v ~ /^[0-9.]+$/) printf "%.0f", v; else printf "?" }'; }
# utime+stime+cutime+cstime of PID, in seconds.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15+$16+$17)/hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# shellcheck source=lib/sshd.sh
. scripts/lib/sshd.sh
"$bin/shardrecv" keygen --out "$work/recv.key" > "$work/recv.fp" 2>/dev/null
"$bin/shardsend" keygen --out "$work/send.key" > "$work/allow" 2>/dev/null

# --- the link and the far end --------------------------------------------------------------
# start_link LINKEMU_ARGS...: fresh namespaces; sshd and shardrecv in side B.
start_link() {
  : > "$work/lemu.out"
  "$bin/linkemu" --json --name "bw$$" --queue "$queue" --offload "$offload" "$@" > "$work/lemu.out" 2> "$work/lemu.err" &
  lemu_pid=$!
  for _ in $(seq 100); do grep -q '"ready"' "$work/lemu.out" && break; sleep 0.05; done
  grep -q '"ready"' "$work/lemu.out" || { echo "linkemu did not start:" >&2; cat "$work/lemu.err" >&2; exit 1; }
  read -r ns_a ns_b addr_b < <(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline()); print(r["ns_a"], r["ns_b"], r["addr_b"])' "$work/lemu.out")
  start_sshd "$work/ssh" "$addr_b" "$ns_b"
  start_recv "$ns_b" "$addr_b:7400"
}

# start_recv NETNS ADDR: shardrecv serve (--congestion $recv_cc if set) into $dst_base/dst.
start_recv() {
  local ns=$1 listen=$2 run=()
  [ -n "$ns" ] && run=(ip netns exec "$ns")
  mkdir -p "$dst_base/dst"
  : > "$work/recv.out"
  "${run[@]}" "$bin/shardrecv" serve --listen "$listen" --root "$dst_base/dst" \
    --identity "$work/recv.key" --allow "$work/allow" ${recv_cc:+--congestion "$recv_cc"} ${window:+--window "$window"} \
    > "$work/recv.out" 2> "$work/recv.log" &
  recv_pid=$!
  for _ in $(seq 200); do [ -s "$work/recv.out" ] && break; sleep 0.05; done
  [ -s "$work/recv.out" ] || { echo "shardrecv did not start:" >&2; cat "$work/recv.log" >&2; exit 1; }
  recv_addr=$(awk '{print $2}' "$work/recv.out")
}

stop_recv() {
  [ -n "$recv_pid" ] && { kill "$recv_pid" 2>/dev/null || true; wait "$recv_pid" 2>/dev/null || true; }
  recv_pid=""
}

stop_link() {
  stop_recv
  [ -n "$sshd_pid" ] && { kill "$sshd_pid" 2>/dev/null || true; wait "$sshd_pid" 2>/dev/null || true; }
  sshd_pid=""
  if [ -n "$lemu_pid" ]; then
    kill -TERM "$lemu_pid" 2>/dev/null || true
    wait "$lemu_pid" 2>/dev/null || true
    # Packets each way over the link's life (every tool of the cell): the b->a count is
    # mostly acknowledgements, a per-packet cost on both ends and in linkemu.
    python3 -c 'import json,sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("event") == "stats":
        for d in ("a_to_b", "b_to_a"):
            s = r["stats"][d]
            print("  linkemu %s: %d packets in, %d out, %d bytes out" % (d, s["packets_in"], s["packets_out"], s["bytes_out"]))' \
      "$work/lemu.out" >&2 || true
  fi
  lemu_pid=""
}

# shardsend_cmd NETNS SRC NAME COMPRESS CC: the shardsend command line (array in `cmd`).
shardsend_cmd() {
  local ns=$1 src=$2 name=$3 compress=$4 cc=$5
  cmd=()
  [ -n "$ns" ] && cmd=(ip netns exec "$ns")
  cmd+=("$bin/shardsend" "$src" "$recv_addr" "$name" --identity "$work/send.key"
    --peer "$(cat "$work/recv.fp")" --no-progress --json --compress "$compress")
  [ -n "$cc" ] && cmd+=(--congestion "$cc")
  [ -n "$window" ] && cmd+=(--window "$window")
  return 0
}

# use_congestion CC: restarts side B's shardrecv when it runs another controller.
recv_cc=""
use_congestion() {
  if [ "$1" != "$recv_cc" ]; then
    recv_cc=$1
    stop_recv
    start_recv "$ns_b" "$addr_b:7400"
  fi
}

# run_tool TOOL CC SRC: copies SRC to side B once; prints "seconds cpu_send cpu_recv ok".
# ok is 1 for a verified copy, 0 for a timeout or failure (seconds is then the time given up at).
# Runs in a subshell (process substitution): it must not change the script's state.
run_tool() {
  local tool=$1 cc=$2 src=$3 name dst far_pid far0 far1 t0 t1 rc=0
  name=$(basename "$src")
  dst=$dst_base/dst
  rm -rf "${dst:?}/$name"
  far0=0
  case $tool in
    ss-*) far_pid=$recv_pid; far0=$(cpu_of "$far_pid") ;;
    tcp)
      # The far end is a socat of its own, timed by /usr/bin/time (its CPU is read from
      # far.txt at the end); the sender retries until it listens.
      ip netns exec "$ns_b" /usr/bin/time -f '%U %S' -o "$work/far.txt" \
        socat -u TCP-LISTEN:7501,reuseaddr OPEN:"$dst/$name",creat,trunc 2> "$work/far.err" &
      far_pid=$!
      ;;
    *) far_pid=$sshd_pid; far0=$(cpu_of "$far_pid") ;;
  esac
  t0=$(now)
  case $tool in
    ss-*)
      shardsend_cmd "$ns_a" "$src" "$name" "${tool#ss-}" "$cc"
      timeout "$timeout_s" /usr/bin/time -f '%U %S' -o "$work/near.txt" "${cmd[@]}" > "$work/send.json" 2> "$work/send.err" || rc=$?
      ;;
    scp)
      timeout "$timeout_s" /usr/bin/time -f '%U %S' -o "$work/near.txt" ip netns exec "$ns_a" \
        scp -q "${ssh_opts[@]}" -P "$ssh_port" "$src" root@"$addr_b":"$dst/" 2> "$work/send.err" || rc=$?
      ;;
    rsync)
      timeout "$timeout_s" /usr/bin/time -f '%U %S' -o "$work/near.txt" ip netns exec "$ns_a" \
        rsync -a --whole-file -e "ssh ${ssh_opts[*]} -p $ssh_port" "$src" root@"$addr_b":"$dst/" 2> "$work/send.err" || rc=$?
      ;;
    tcp)
      timeout "$timeout_s" /usr/bin/time -f '%U %S' -o "$work/near.txt" ip netns exec "$ns_a" \
        socat -u OPEN:"$src" TCP:"$addr_b":7501,retry=100,interval=0.02 2> "$work/send.err" || rc=$?
      # The copy is done when the far end has written and closed the file.
      [ "$rc" = 0 ] || kill "$far_pid" 2>/dev/null || true
      local far_rc=0
      wait "$far_pid" 2>/dev/null || far_rc=$?
      [ "$rc" = 0 ] && rc=$far_rc
      ;;
  esac
  t1=$(now)
  sleep 0.3 # let sshd reap the session so its CPU shows in cutime
  if [ "$tool" = tcp ]; then
    far1=$(awk '/^[0-9.]+ [0-9.]+$/ {print $1+$2}' "$work/far.txt" 2>/dev/null || echo 0)
  else
    far1=$(cpu_of "$far_pid")
  fi
  local ok=1
  if [ "$rc" != 0 ] || ! cmp -s "$src" "$dst/$name"; then
    ok=0
    echo "  $tool ($cc) failed or timed out (rc $rc): $(tail -c 300 "$work/send.err" | tr '\n' ' ')" >&2
  fi
  local cpu_send
  cpu_send=$(awk '/^[0-9.]+ [0-9.]+$/ {print $1+$2}' "$work/near.txt" 2>/dev/null || echo "?")
  echo "$(echo "$t1 - $t0" | bc -l) ${cpu_send:-?} $(echo "$far1 - $far0" | bc -l) $ok"
}

# Read now: a section is written at the end, when the load is the benchmark's own.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u +%Y-%m-%dT%H:%MZ)
machine="$(nproc) cores, $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
ceiling=$("$bin/linkemu" --measure-ceiling --measure-for 3s 2>/dev/null | head -1)
echo "$ceiling" >&2
. scripts/lib/results.sh

# Expands the tool list with one shardsend entry per congestion controller: "tool:cc".
tool_runs() {
  local t c
  for t in $tools; do
    if [ "$t" != "${t#ss-}" ] && [ -n "$congestions" ]; then
      for c in $congestions; do echo "$t:$c"; done
    else
      echo "$t:"
    fi
  done
}

# --- WAN matrix ------------------------------------------------------------------------------
if [ "$do_wan" = 1 ]; then
  head -c "$(numfmt --from=iec "$size")" /dev/urandom > "$work/random.bin"
  bytes=$(stat -c %s "$work/random.bin")
  csv=bench/out/wan.csv
  echo "rate,rtt_ms,loss,tool,congestion,seconds,mbit_s,pct_link,x_scp,cpu_send,cpu_recv,ok" > "$csv"
  cells=()
  for r in $rates; do for t in $rtts; do for l in $losses; do cells+=("$r $t $l"); done; done
    [ "$bursty" = 1 ] && cells+=("$r 50 bursty")
  done
  table="| rate | RTT | loss | tool | seconds | Mbit/s | % of link | x scp | CPU s send | CPU s recv |
|---|---|---|---|---|---|---|---|---|---|"
  for cell in "${cells[@]}"; do
    read -r r t l <<< "$cell"
    delay=$(echo "$t / 2" | bc -l)ms
    if [ "$l" = bursty ]; then loss_args=(--burst-loss 0.25%,25%); else loss_args=(--loss "$l%"); fi
    rate_bps=$(numfmt --from=si "$r")
    start_link --rate "$r" --delay "$delay" "${loss_args[@]}"
    declare -A secs=() send=() recv=() okay=()
    for tr in $(tool_runs); do
      tool=${tr%%:*}; cc=${tr#*:}
      [ "$tool" != "${tool#ss-}" ] && use_congestion "$cc"
      read -r s cs cr ok < <(run_tool "$tool" "$cc" "$work/random.bin")
      secs[$tr]=$s; send[$tr]=$cs; recv[$tr]=$cr; okay[$tr]=$ok
      echo "$r rtt ${t}ms loss $l: $tool${cc:+ ($cc)} ${s}s ok=$ok" >&2
    done
    stop_link
    scp_s=${secs["scp:"]:-}
    for tr in $(tool_runs); do
      tool=${tr%%:*}; cc=${tr#*:}; s=${secs[$tr]}
      mbit=$(echo "$bytes * 8 / $s / 1000000" | bc -l)
      pct=$(echo "100 * $bytes * 8 / $s / $rate_bps" | bc -l)
      xscp="?"; [ -n "$scp_s" ] && xscp=$(printf %.2f "$(echo "$scp_s / $s" | bc -l)")
      shown_s=$(printf %.2f "$s"); [ "${okay[$tr]}" = 1 ] || shown_s="> $shown_s (failed)"
      echo "$r,$t,$l,$tool,$cc,$s,$mbit,$pct,$xscp,${send[$tr]},${recv[$tr]},${okay[$tr]}" >> "$csv"
      table+=$'\n'"$(printf '| %s | %s ms | %s | %s | %s | %.1f | %.0f%% | %s | %s | %s |' \
        "$r" "$t" "$([ "$l" = bursty ] && echo "bursty ~1%" || echo "$l%")" "$tool${cc:+ ($cc)}" \
        "$shown_s" "$mbit" "$pct" "$xscp" "$(num2 "${send[$tr]}")" "$(num2 "${recv[$tr]}")")"
    done
  done
  chart=bench/out/wan-link-share.svg
  if [ "$write" = 1 ] && [ "$smoke" = 0 ]; then chart=bench/wan-link-share.svg; fi
  python3 scripts/lib/wan_chart.py "$csv" "$chart"
  section="## WAN matrix (issue 12): shardsend vs scp, rsync over linkemu

- date: $started to $(date -u +%H:%MZ); load before the run: $load_before
- machine: $machine
- command: \`scripts/bench-wan.sh $orig_args\`
- link: linkemu (userspace, TUN in two namespaces, segmentation offload $offload), rate per direction, drop-tail queue $queue,
  RTT = 2 x one-way delay, random loss per packet and direction; bursty = Gilbert-Elliott
  0.25%,25% (~1% in bursts of 4). $ceiling
- payload: $bytes random bytes (\`$size\`), one copy per tool and cell, verified with cmp;
  shardsend: ss-off = \`--compress off\`, ss-auto = \`--compress auto\`; scp and rsync over
  sshd in side B; tcp = one bare kernel TCP socket (socat to socat: no encryption, no
  verification), the link's reference; kernel TCP congestion control: $(sysctl -n net.ipv4.tcp_congestion_control)
- CPU s: user+system seconds of the sending process / of shardrecv, sshd (with its session) or socat
- chart: [wan-link-share.svg](wan-link-share.svg) (% of link against loss)

$table"
  echo "$section"
  if [ "$write" = 1 ] && [ "$smoke" = 0 ]; then write_results_section "$out" "## WAN matrix (issue 12)" "$section"; fi
fi

# --- fairness: one TCP flow and shardsend on one 100 Mbit link ----------------------------
if [ "$do_fair" = 1 ]; then
  fair_size=${FAIR_SIZE:-200M}
  [ "$smoke" = 1 ] && fair_size=30M
  head -c "$(numfmt --from=iec "$fair_size")" /dev/urandom > "$work/fair.bin"
  fbytes=$(stat -c %s "$work/fair.bin")
  table="| shardsend congestion | shardsend Mbit/s | shardsend share | TCP Mbit/s | TCP share | TCP alone Mbit/s |
|---|---|---|---|---|---|"
  for cc in ${congestions:-default}; do
    [ "$cc" = default ] && cc=""
    recv_cc=$cc
    start_link --rate 100M --delay 25ms
    # A TCP receiver in B logging "time bytes" every 0.2 s, a sender in A writing until killed.
    ip netns exec "$ns_b" python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5202)); s.listen(1); c, _ = s.accept()
total, last = 0, 0.0
with open(sys.argv[2], "w") as log:
    while True:
        n = len(c.recv(1 << 20))
        if n == 0: break
        total += n
        t = time.time()
        if t - last > 0.2: log.write(f"{t} {total}\n"); log.flush(); last = t
' "$addr_b" "$work/tcp.log" &
    tcp_rx=$!
    sleep 0.5
    ip netns exec "$ns_a" python3 -c '
import socket, sys
c = socket.create_connection((sys.argv[1], 5202)); buf = bytes(1 << 20)
while True: c.sendall(buf)
' "$addr_b" 2>/dev/null &
    tcp_tx=$!
    sleep 8 # TCP alone: past BBR startup
    shardsend_cmd "$ns_a" "$work/fair.bin" fair.bin off "$cc"
    t0=$(now)
    fair_ok=1
    # A scavenger may take long here: give it at least 10 minutes before cutting it.
    timeout "$(( timeout_s > 600 ? timeout_s : 600 ))" "${cmd[@]}" > "$work/send.json" 2> "$work/send.err" || {
      fair_ok=0; echo "shardsend failed or was cut: $(tail -c 300 "$work/send.err")" >&2; }
    t1=$(now)
    sleep 1
    kill "$tcp_tx" 2>/dev/null || true; wait "$tcp_tx" 2>/dev/null || true
    wait "$tcp_rx" 2>/dev/null || true
    read -r ss_mbit tcp_mbit tcp_alone < <(python3 - "$work/tcp.log" "$t0" "$t1" "$fbytes" <<'PY'
import sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
t0, t1, size = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def at(t):  # bytes received by time t, linear between samples
    prev = (rows[0][0], 0.0)
    for r in rows:
        if r[0] >= t:
            f = (t - prev[0]) / max(r[0] - prev[0], 1e-9)
            return prev[1] + f * (r[1] - prev[1])
        prev = r
    return rows[-1][1]
during = (at(t1) - at(t0)) * 8 / (t1 - t0) / 1e6
alone = (at(t0) - at(t0 - 3)) * 8 / 3 / 1e6
print(f"{size * 8 / (t1 - t0) / 1e6:.1f} {during:.1f} {alone:.1f}")
PY
)
    stop_link
    [ "$fair_ok" = 1 ] || ss_mbit="? (cut)"
    # On a 100 Mbit/s link the share in % is the rate in Mbit/s.
    table+=$'\n'"$(printf '| %s | %s | %s%% | %s | %s%% | %s |' "${cc:-default}" "$ss_mbit" \
      "$(pct0 "$ss_mbit")" "$tcp_mbit" "$(pct0 "$tcp_mbit")" "$tcp_alone")"
    echo "fairness ${cc:-default}: shardsend $ss_mbit Mbit/s, TCP $tcp_mbit Mbit/s (alone $tcp_alone)" >&2
  done
  section="## WAN fairness (issue 12): shardsend and one TCP flow on a 100 Mbit link

- date: $started to $(date -u +%H:%MZ); load before the run: $load_before
- machine: $machine
- command: \`scripts/bench-wan.sh $orig_args\`
- link: linkemu 100 Mbit/s, RTT 50 ms, no loss, queue $queue; TCP flow: python sender in A to
  a receiver in B, kernel TCP ($(sysctl -n net.ipv4.tcp_congestion_control)), running alone for 8 s
  before shardsend (\`--compress off\`, $fbytes random bytes) starts; shares are of the link
  rate while shardsend runs (TCP bytes from the receiver's log over shardsend's interval)

$table"
  echo "$section"
  if [ "$write" = 1 ] && [ "$smoke" = 0 ]; then write_results_section "$out" "## WAN fairness (issue 12)" "$section"; fi
fi

# --- auto matrix: is `auto` within 10% of the best fixed choice? ---------------------------
# Slow links get small data (a 16 Mbit cell of 400 MB would take minutes per run), fast ones
# (1G, loopback) data large enough that a run lasts seconds, not a fraction of one (startup
# and one measurement window would decide it). Each cell: one untimed warm-up run (page
# cache, the receiver's first transfer), then AUTO_RUNS timed runs per choice, median.
make_auto_data() { # DIR TEXT_SIZE DATA_SIZE
  local dir=$1
  mkdir -p "$dir"
  "$bin/mkfixture" worktree --size "$2" --out "$work/wt" --seed 1 >/dev/null
  (cd "$work/wt" && tar --exclude=.git -cf - .) | (mkdir -p "$dir/text" && cd "$dir/text" && tar -xf -)
  rm -rf "$work/wt"
  "$bin/mkfixture" bare --size "$3" --out "$dir/pack.git" --seed 2 >/dev/null
  head -c "$(numfmt --from=iec "$3")" /dev/urandom > "$dir/random.bin"
}
median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
if [ "$do_auto" = 1 ]; then
  text_size=${AUTO_TEXT_SIZE:-60M}; data_size=${AUTO_DATA_SIZE:-50M}
  fast_text_size=${AUTO_FAST_TEXT_SIZE:-1G}; fast_data_size=${AUTO_FAST_DATA_SIZE:-400M}
  runs=${AUTO_RUNS:-1}
  auto_links=${AUTO_LINKS:-"16M 100M 1G loopback"}
  if [ "$smoke" = 1 ]; then
    text_size=8M; data_size=4M; fast_text_size=8M; fast_data_size=4M; auto_links="100M loopback"
  fi
  table="| data | link | off s | zstd:1 s | zstd:3 s | auto s | auto / best | auto's reason |
|---|---|---|---|---|---|---|---|"
  for link in $auto_links; do
    case "$link" in
      loopback|*G) set_dir=$work/auto-fast; t_size=$fast_text_size; d_size=$fast_data_size ;;
      *) set_dir=$work/auto-slow; t_size=$text_size; d_size=$data_size ;;
    esac
    if [ ! -d "$set_dir" ]; then
      echo "making fixtures ($t_size text, $d_size pack and random)..." >&2
      make_auto_data "$set_dir" "$t_size" "$d_size"
    fi
    recv_cc=""
    if [ "$link" = loopback ]; then
      start_recv "" 127.0.0.1:0; ns_a=""
    else
      start_link --rate "$link" --delay 5ms
    fi
    for data in ${AUTO_DATA:-text pack.git random.bin}; do
      src=$set_dir/$data
      bytes=$(du -sb "$src" | cut -f1)
      declare -A tm=()
      rm -rf "$dst_base/dst/$data"
      shardsend_cmd "$ns_a" "$src" "$data" auto ""
      timeout "$timeout_s" "${cmd[@]}" > /dev/null 2>&1 || true
      tm=([off]=- [zstd:1]=- [zstd:3]=- [auto]=-); reason="-"
      for c in ${AUTO_CHOICES:-off zstd:1 zstd:3 auto}; do
        times=""
        for _ in $(seq "$runs"); do
          rm -rf "$dst_base/dst/$data"
          shardsend_cmd "$ns_a" "$src" "$data" "$c" ""
          [ -n "${AUTO_TRACE:-}" ] && [ "$c" = auto ] && cmd=(env RUST_LOG=info,transfer::compress=debug "${cmd[@]}")
          t0=$(now)
          timeout "$timeout_s" "${cmd[@]}" > "$work/send.json" 2> "$work/send.err" || echo "shardsend $c failed: $(tail -c 300 "$work/send.err")" >&2
          t1=$(now)
          times+="$(echo "$t1 - $t0" | bc -l)"$'\n'
          python3 -c 'import json,sys
s=json.load(open(sys.argv[1])); c=s["compression"]
print("  run %s: %.2f s, %d wire bytes, %d probes: %s" % (sys.argv[2], float(sys.argv[3]), s["wire_bytes"], c["probes"], c["reason"]))' \
            "$work/send.json" "$c" "$(echo "$t1 - $t0" | bc -l)" >&2 2>/dev/null || true
          if [ -n "${AUTO_TRACE:-}" ] && [ "$c" = auto ]; then
            { echo "== $link $data $c"; cat "$work/send.err"; } >> "$AUTO_TRACE"
          fi
        done
        tm[$c]=$(printf '%s' "$times" | median)
        [ "$c" = auto ] && reason=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["compression"]; print("%s (level %d, %d probes)" % (c["reason"], c["level"], c["probes"]))' "$work/send.json" 2>/dev/null | tr '|' '/' || echo "?")
        echo "auto matrix $link $data $c: ${tm[$c]}s" >&2
      done
      best=$(printf '%s\n' "${tm[off]}" "${tm[zstd:1]}" "${tm[zstd:3]}" | grep -v '^-$' | sort -g | head -1 || true)
      ratio=-
      [ -n "$best" ] && [ "${tm[auto]}" != - ] && ratio=$(num2 "$(echo "${tm[auto]} / $best" | bc -l)")
      table+=$'\n'"$(printf '| %s (%s bytes) | %s | %s | %s | %s | %s | %s | %s |' "${data%%.*}" "$bytes" "$link" \
        "$(num2 "${tm[off]}")" "$(num2 "${tm[zstd:1]}")" "$(num2 "${tm[zstd:3]}")" "$(num2 "${tm[auto]}")" "$ratio" "$reason")"
    done
    if [ "$link" = loopback ]; then stop_recv; else stop_link; fi
  done
  section="## WAN auto matrix (issue 12): compression off vs zstd:1 vs zstd:3 vs auto

- date: $started to $(date -u +%H:%MZ); load before the run: $load_before
- machine: $machine
- command: \`AUTO_LINKS=\"$auto_links\" AUTO_TEXT_SIZE=$text_size AUTO_DATA_SIZE=$data_size AUTO_FAST_TEXT_SIZE=$fast_text_size AUTO_FAST_DATA_SIZE=$fast_data_size AUTO_RUNS=$runs scripts/bench-wan.sh $orig_args\`
- links: linkemu at the given rate, RTT 10 ms, no loss; loopback without linkemu. Data: text =
  the checkout of \`mkfixture worktree --size SIZE\` (no .git), pack = \`mkfixture bare
  --size SIZE\`, random = SIZE of /dev/urandom; SIZE $text_size / $data_size below 1 Gbit,
  $fast_text_size / $fast_data_size at 1 Gbit and on loopback. One warm-up run per cell, then
  the median of $runs run(s) per choice; auto / best < 1.10 is the bar.

$table"
  echo "$section"
  if [ "$write" = 1 ] && [ "$smoke" = 0 ]; then write_results_section "$out" "## WAN auto matrix (issue 12)" "$section"; fi
fi
