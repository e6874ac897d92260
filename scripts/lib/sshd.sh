# Sourced by the benchmark scripts: a throwaway sshd with keys made in a temp dir.
#
#   start_loopback_sshd DIR [SUBSYSTEM_SFTP_COMMAND]
#   start_sshd DIR ADDR NETNS [SUBSYSTEM_SFTP_COMMAND]
#
# Sets ssh_port, ssh_opts (an array for ssh/scp) and sshd_pid. Keys are made in DIR (once; a
# second call reuses them). start_loopback_sshd listens on a free port of 127.0.0.1;
# start_sshd listens on ADDR:22 inside network namespace NETNS (`ip netns exec`, which execs,
# so sshd_pid is sshd itself and its /proc/PID/stat cutime+cstime count the finished sessions).
# Nothing listens beyond the given address. The caller kills "$sshd_pid" when done.
start_loopback_sshd() {
  local port
  port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  _start_sshd "$1" 127.0.0.1 "$port" "" "${2:-/usr/lib/openssh/sftp-server}"
}

start_sshd() {
  _start_sshd "$1" "$2" 22 "$3" "${4:-/usr/lib/openssh/sftp-server}"
}

_start_sshd() {
  local dir=$1 addr=$2 port=$3 ns=$4 sftp=$5
  local run=()
  [ -n "$ns" ] && run=(ip netns exec "$ns")
  mkdir -p "$dir" /run/sshd
  if [ ! -f "$dir/host" ]; then
    ssh-keygen -q -t ed25519 -N '' -f "$dir/host" >/dev/null
    ssh-keygen -q -t ed25519 -N '' -f "$dir/user" >/dev/null
    cp "$dir/user.pub" "$dir/authorized_keys"
    chmod 600 "$dir/authorized_keys"
  fi
  ssh_port=$port
  "${run[@]}" /usr/sbin/sshd -f /dev/null -p "$ssh_port" -o ListenAddress="$addr" -o HostKey="$dir/host" \
    -o AuthorizedKeysFile="$dir/authorized_keys" -o StrictModes=no -o PermitRootLogin=yes \
    -o PidFile="$dir/sshd.pid" -o "Subsystem=sftp $sftp" -D &
  sshd_pid=$!
  ssh_opts=(-i "$dir/user" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes)
  for _ in $(seq 50); do "${run[@]}" ssh "${ssh_opts[@]}" -p "$ssh_port" root@"$addr" true 2>/dev/null && return 0; sleep 0.1; done
  echo "sshd did not come up on $addr:$ssh_port" >&2
  return 1
}
