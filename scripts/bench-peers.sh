#!/usr/bin/env bash
# Loopback benchmark: shardsend vs a raw TCP pipe (socat), scp and rsync over ssh, in one run.
#
#   scripts/bench-peers.sh [--size 2G] [--runs 3] [--repo PATH] [--out bench/RESULTS.md] [--no-write]
#                          [--bin DIR]   (shardsend/shardrecv from DIR, e.g. an older build's
#                                         target/release, instead of this tree's; implies --no-write)
#
# For each payload (SIZE of random data, and the tree of a bare repository if --repo is given or
# `mkfixture` can make one) every tool copies the payload from one directory to another on this
# machine, best of RUNS. The destination is a tmpfs (/dev/shm, or --dst DIR): this VM's disk takes
# durable writes at ~340 MB/s (dd conv=fsync), which would cap every tool at the same figure and
# hide the transports. Each copy still ends "durable" (shardrecv syncfs's before install, the
# peers get a `sync` inside the timed command), which on tmpfs costs nothing for anyone.
# Peak RSS and CPU seconds (user + system, per GiB moved) of both ends come from
# /usr/bin/time -v; the far ends of scp (sftp-server) and rsync are wrapped through sshd's
# Subsystem line and --rsync-path (sshd's own share, the decryption, is not counted for them).
# sshd runs on a loopback port with throwaway keys; nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

size=2G
runs=3
repo=""
out=bench/RESULTS.md
write=1
dst_base=/dev/shm
other_bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-write) write=0; shift ;;
    --dst) dst_base=$2; shift 2 ;;
    --bin) other_bin=$2; write=0; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh >/dev/null
cargo build --release -q -p transfer -p fixtures
bin=$PWD/target/release
fixture_bin=$bin
if [ -n "$other_bin" ]; then
  bin=$(cd "$other_bin" && pwd)
  for b in shardsend shardrecv; do
    [ -x "$bin/$b" ] || { echo "no executable $b in $bin" >&2; exit 2; }
  done
fi
work=$(mktemp -d /var/tmp/bench-peers.XXXXXX)
dst_dir=$(mktemp -d "$dst_base/bench-peers-dst.XXXXXX")
sshd_pid=""
cleanup() {
  [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null || true
  pkill -f "shardrecv serve --listen 127.0.0.1:0 --root $dst_dir" 2>/dev/null || true
  rm -rf "$work" "$dst_dir"
}
trap cleanup EXIT

# --- payloads -------------------------------------------------------------------------------
mkdir -p "$work/src"
echo "making $size of random data..." >&2
head -c "$(numfmt --from=iec "$size")" /dev/urandom > "$work/src/random.bin"
payloads=("random.bin")
if [ -z "$repo" ] && [ -x "$fixture_bin/mkfixture" ]; then
  echo "making a 200M bare repository fixture..." >&2
  if "$fixture_bin/mkfixture" bare --size 200M --out "$work/src/fixture.git" --seed 1 >/dev/null 2>&1; then
    payloads+=("fixture.git")
  fi
elif [ -n "$repo" ]; then
  cp -a "$repo" "$work/src/repo.git"
  payloads+=("repo.git")
fi

# --- sshd on loopback -------------------------------------------------------------------------
far_rss=$work/far-rss.txt
# shellcheck source=lib/sshd.sh
. scripts/lib/sshd.sh
start_loopback_sshd "$work/ssh" "/usr/bin/time -v -o $far_rss /usr/lib/openssh/sftp-server"

# --- shardsend keys ---------------------------------------------------------------------------
"$bin/shardrecv" keygen --out "$work/recv.key" > "$work/recv.fp" 2>/dev/null
"$bin/shardsend" keygen --out "$work/send.key" > "$work/allow" 2>/dev/null

# Peak RSS (MiB) and CPU seconds (user + system) that /usr/bin/time -v recorded in FILE, or ?
# when it recorded nothing.
rss_of() { [ -s "$1" ] || { echo '?'; return; }; awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }
cpu_of() { [ -s "$1" ] || { echo '?'; return; }; awk -F': ' '/User time|System time/ {s += $2} END {printf "%.2f", s}' "$1"; }
now() { date +%s.%N; }
# CPU seconds per GiB moved, or ? when the far end's CPU was not recorded.
per_gib() { case $1 in ''|'?') echo '?' ;; *) printf '%.2f' "$(echo "$1 * 1073741824 / $2" | bc -l)" ;; esac; }

# Runs one copy; prints "seconds near_rss_mib far_rss_mib near_cpu_s far_cpu_s".
run_one() {
  local tool=$1 name=$2 dst=$dst_dir/dst
  rm -rf "$dst" "$work/near.txt" "$far_rss"; mkdir -p "$dst"
  sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
  # Warm the source back into the page cache so every tool reads from memory.
  cat "$work/src/$name" > /dev/null 2>&1 || tar -C "$work/src" -cf - "$name" > /dev/null
  local t0 t1
  case $tool in
    shardsend)
      /usr/bin/time -v -o "$far_rss" "$bin/shardrecv" serve --listen 127.0.0.1:0 --root "$dst" \
        --identity "$work/recv.key" --allow "$work/allow" > "$work/recv.out" 2> "$work/recv.log" &
      local rpid=$!
      for _ in $(seq 600); do [ -s "$work/recv.out" ] && break; sleep 0.05; done
      local addr; addr=$(awk '{print $2}' "$work/recv.out")
      if [ -z "$addr" ]; then
        echo "shardrecv did not start:" >&2; cat "$work/recv.log" >&2
        for p in $(pgrep -P "$rpid"); do
          for t in /proc/$p/task/*; do echo "  thread $(cat "$t/comm") wchan=$(cat "$t/wchan") state=$(awk '{print $3}' "$t/stat")" >&2; done
          cat "/proc/$p/stack" >&2 2>/dev/null || true
        done
        exit 1
      fi
      t0=$(now)
      /usr/bin/time -v -o "$work/near.txt" "$bin/shardsend" "$work/src/$name" "$addr" "$name" \
        --identity "$work/send.key" --peer "$(cat "$work/recv.fp")" --no-progress --json > "$work/send.json"
      t1=$(now)
      # Stop shardrecv itself (not the time wrapper) so /usr/bin/time reports its peak RSS.
      pkill -TERM -P "$rpid" 2>/dev/null || true; wait "$rpid" 2>/dev/null || true
      ;;
    socat)
      local port; port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
      if [ -d "$work/src/$name" ]; then
        (cd "$dst" && /usr/bin/time -v -o "$far_rss" socat -b 4194304 -u TCP-LISTEN:"$port",bind=127.0.0.1,reuseaddr STDOUT | tar -xf -) &
      else
        /usr/bin/time -v -o "$far_rss" socat -b 4194304 -u TCP-LISTEN:"$port",bind=127.0.0.1,reuseaddr CREATE:"$dst/$name" &
      fi
      local lpid=$!
      for _ in $(seq 100); do ss -ltn | grep -q ":$port " && break; sleep 0.02; done
      t0=$(now)
      if [ -d "$work/src/$name" ]; then
        tar -C "$work/src" -cf - "$name" | /usr/bin/time -v -o "$work/near.txt" socat -b 4194304 -u STDIN TCP:127.0.0.1:"$port"
      else
        /usr/bin/time -v -o "$work/near.txt" socat -b 4194304 -u OPEN:"$work/src/$name" TCP:127.0.0.1:"$port"
      fi
      wait "$lpid"; sync "$dst"/* 2>/dev/null || sync
      t1=$(now)
      ;;
    scp)
      t0=$(now)
      /usr/bin/time -v -o "$work/near.txt" scp -q -r "${ssh_opts[@]}" -P "$ssh_port" "$work/src/$name" root@127.0.0.1:"$dst/"
      sync "$dst"/* 2>/dev/null || sync
      t1=$(now)
      ;;
    rsync)
      t0=$(now)
      /usr/bin/time -v -o "$work/near.txt" rsync -a --whole-file -e "ssh ${ssh_opts[*]} -p $ssh_port" \
        --rsync-path="/usr/bin/time -v -o $far_rss rsync" "$work/src/$name" root@127.0.0.1:"$dst/"
      sync "$dst"/* 2>/dev/null || sync
      t1=$(now)
      ;;
  esac
  # Every tool must have produced an identical copy.
  if ! diff -rq "$work/src/$name" "$dst/$name" > /dev/null; then
    echo "ERROR: $tool produced a different copy of $name" >&2; exit 1
  fi
  echo "$(echo "$t1 - $t0" | bc -l) $(rss_of "$work/near.txt") $(rss_of "$far_rss")" \
    "$(cpu_of "$work/near.txt") $(cpu_of "$far_rss")"
}

tools=(shardsend socat scp rsync)
declare -A best near far near_cpu far_cpu
table=""
for name in "${payloads[@]}"; do
  bytes=$(du -sb "$work/src/$name" | cut -f1)
  for tool in "${tools[@]}"; do
    best[$tool]=""
    for r in $(seq "$runs"); do
      read -r secs n f nc fc < <(run_one "$tool" "$name")
      echo "$name $tool run $r: ${secs}s near ${n}MiB ${nc} CPU-s, far ${f}MiB ${fc} CPU-s" >&2
      if [ -z "${best[$tool]}" ] || (( $(echo "$secs < ${best[$tool]}" | bc -l) )); then
        best[$tool]=$secs; near[$tool]=$n; far[$tool]=$f; near_cpu[$tool]=$nc; far_cpu[$tool]=$fc
      fi
    done
  done
  table+=$'\n'"**$name** ($bytes bytes, best of $runs)"$'\n\n'
  table+="| tool | seconds | MB/s | x scp | x rsync | peak RSS sender (MiB) | peak RSS receiver (MiB) | CPU s/GiB sender | CPU s/GiB receiver |"$'\n'
  table+="|---|---|---|---|---|---|---|---|---|"$'\n'
  for tool in "${tools[@]}"; do
    s=${best[$tool]}
    table+=$(printf "| %s | %.2f | %.0f | %.2f | %.2f | %s | %s | %s | %s |" "$tool" "$s" \
      "$(echo "$bytes / $s / 1000000" | bc -l)" \
      "$(echo "${best[scp]} / $s" | bc -l)" "$(echo "${best[rsync]} / $s" | bc -l)" \
      "${near[$tool]}" "${far[$tool]}" \
      "$(per_gib "${near_cpu[$tool]}" "$bytes")" "$(per_gib "${far_cpu[$tool]}" "$bytes")")$'\n'
  done
done

machine="$(nproc) cores, $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
section="## Loopback peers (issue 3): shardsend vs socat, scp, rsync

- date: $(date -u +%Y-%m-%dT%H:%MZ)
- machine: $machine
- command: \`scripts/bench-peers.sh --size $size --runs $runs${other_bin:+ --bin $other_bin}\`
- source in the page cache, destination on tmpfs (the VM disk's ~340 MB/s durable write speed
  would cap every tool alike); every copy checked identical with \`diff -r\`;
- shardsend: defaults (auto compression, 4 streams, 2 MiB chunks), BLAKE3-verified on both sides,
  staged then installed; scp and rsync: OpenSSH defaults over a loopback sshd; socat: \`-b 4194304\`.
$table"
echo "$section"
if [ "$write" = 1 ]; then
  # shellcheck source=lib/results.sh
  . scripts/lib/results.sh
  write_results_section "$out" "## Loopback peers (issue 3)" "$section"
fi

