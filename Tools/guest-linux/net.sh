#!/usr/bin/env bash
# The on-machine network of the guest-linux tests (as in /work/shared/notes/linux-guest.md):
# a bridge in the root namespace (no address: addrgenmode none) that libvirt attaches the
# guest's tap to, and a veth pair whose other end is in a network namespace holding the
# client at 10.77.0.1/24. The guest is 10.77.0.2/24. Nothing leaves this machine.
#   net.sh up TAG      creates bridge glbrTAG, veth glvhTAG/glvnTAG, namespace glTAG
#   net.sh down TAG    removes them (idempotent)
# TAG: a few characters (interface names are at most 15). Root only.
set -euo pipefail
cmd="${1:?usage: net.sh up|down TAG}"; tag="${2:?usage: net.sh up|down TAG}"
br="glbr$tag"; vh="glvh$tag"; vn="glvn$tag"; ns="gl$tag"
case "$cmd" in
  up)
    ip netns add "$ns"
    ip link add "$br" type bridge
    ip link set "$br" addrgenmode none 2>/dev/null || true
    ip link add "$vh" type veth peer name "$vn"
    ip link set "$vh" addrgenmode none 2>/dev/null || true
    ip link set "$vh" master "$br" up
    ip link set "$vn" netns "$ns"
    ip -n "$ns" addr add 10.77.0.1/24 dev "$vn"
    ip -n "$ns" link set "$vn" up
    ip -n "$ns" link set lo up
    ip link set "$br" up
    echo "bridge=$br namespace=$ns client=10.77.0.1 guest=10.77.0.2"
    ;;
  down)
    ip link del "$vh" 2>/dev/null || true
    ip link del "$br" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    ;;
  *) echo "usage: net.sh up|down TAG" >&2; exit 2;;
esac
