#!/usr/bin/env bash
# Two "shard hosts" in network namespaces joined by a veth pair, optionally rate-limited.
#
#   scripts/netns.sh up NAME SUBNET [RATE]   # e.g. up smx 10.231.7 50mbit
#   scripts/netns.sh down NAME
#
# Creates namespaces NAME-a (SUBNET.1) and NAME-b (SUBNET.2) with loopback up, and when RATE is
# given a tbf qdisc (burst 64kb, latency 200ms) on both ends. Run commands inside with
# `ip netns exec NAME-a CMD`. This kernel has no netem; delay and loss would need a userspace
# emulator, which this script does not provide. Needs root and iproute2. Only the private
# SUBNET inside the namespaces is used: nothing reaches any other network.
set -euo pipefail
cmd=${1:-}; name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || { sed -n '2,12p' "$0"; exit 2; }
case $cmd in
  up)
    subnet=${3:?SUBNET like 10.231.7}; rate=${4:-}
    ip netns add "$name-a"
    ip netns add "$name-b"
    ip link add "$name-va" type veth peer name "$name-vb"
    ip link set "$name-va" netns "$name-a"
    ip link set "$name-vb" netns "$name-b"
    ip -n "$name-a" addr add "$subnet.1/24" dev "$name-va"
    ip -n "$name-b" addr add "$subnet.2/24" dev "$name-vb"
    for side in a b; do
      ip -n "$name-$side" link set lo up
      ip -n "$name-$side" link set "$name-v$side" up
      if [ -n "$rate" ]; then
        ip netns exec "$name-$side" tc qdisc add dev "$name-v$side" root tbf rate "$rate" burst 64kb latency 200ms
      fi
    done
    ;;
  down)
    ip netns del "$name-a" 2>/dev/null || true
    ip netns del "$name-b" 2>/dev/null || true
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
