#!/bin/sh
# Compares QEMU's two framed NIC backends with the tiny guest sending numbered datagrams as fast
# as it can: -netdev socket,listen= (TCP on loopback: what libvirt's <interface type='server'>
# gives an enrolled domain) and -netdev stream,server=on on a unix socket (a QEMU the agent
# starts uses -netdev stream too, as the client). A reader answers the guest's ARP and counts
# datagrams for 8 s, keeping up or pausing 20 ms every 20 frames. docs/NETWORK.md has the figures.
#   Bench/nic-backend/run.sh [GUEST_ELF]    (default: Tools/guest-tiny/build.sh's)
set -e
here=$(cd "$(dirname "$0")" && pwd)
elf=${1:-$("$here/../../Tools/guest-tiny/build.sh")}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
run() {
  if [ "$1" = tcp ]; then nd="socket,id=n0,listen=127.0.0.1:47690"; ad=127.0.0.1:47690
  else nd="stream,id=n0,server=on,addr.type=unix,addr.path=$dir/s.sock"; ad=$dir/s.sock; rm -f "$ad"; fi
  qemu-system-x86_64 -machine pc,accel=tcg -m 16 -display none -serial null -kernel "$elf" \
    -append "pages=8 net=1 ip=0x0a4d0064 sink_ip=0x0a4d0004 sink_port=7777 send_every=256" \
    -netdev "$nd" -device ne2k_isa,netdev=n0,mac=52:54:00:aa:bb:09 2>/dev/null & q=$!
  python3 "$here/reader.py" "$1" "$ad" 8 "$2"
  kill $q; wait $q 2>/dev/null || true
}
for kind in tcp unix; do for mode in keep pause; do run $kind $mode; done; done
