# Sourced by the benchmark scripts: a throwaway sshd on a loopback port.
#
#   start_loopback_sshd DIR [SUBSYSTEM_SFTP_COMMAND]
#
# Sets ssh_port, ssh_opts (an array for ssh/scp) and sshd_pid. Keys are made in DIR; nothing
# listens beyond 127.0.0.1. The caller kills "$sshd_pid" when done.
start_loopback_sshd() {
  local dir=$1 sftp=${2:-/usr/lib/openssh/sftp-server}
  mkdir -p "$dir" /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f "$dir/host" >/dev/null
  ssh-keygen -q -t ed25519 -N '' -f "$dir/user" >/dev/null
  cp "$dir/user.pub" "$dir/authorized_keys"
  chmod 600 "$dir/authorized_keys"
  ssh_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  /usr/sbin/sshd -f /dev/null -p "$ssh_port" -o ListenAddress=127.0.0.1 -o HostKey="$dir/host" \
    -o AuthorizedKeysFile="$dir/authorized_keys" -o StrictModes=no -o PermitRootLogin=yes \
    -o PidFile="$dir/sshd.pid" -o "Subsystem=sftp $sftp" -D &
  sshd_pid=$!
  ssh_opts=(-i "$dir/user" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes)
  for _ in $(seq 50); do ssh "${ssh_opts[@]}" -p "$ssh_port" root@127.0.0.1 true 2>/dev/null && return 0; sleep 0.1; done
  echo "sshd did not come up on port $ssh_port" >&2
  return 1
}
