#!/usr/bin/env bash
# Boots the guest-linux test guest under QEMU/TCG and checks it end to end:
# boot time, the counter's physical address on the serial console, the counter growing in the
# shared RAM file, QMP stop freezing it and cont resuming it, the UDP request/reply service
# and the periodic UDP packets to the sink, then the TCP transaction service with its log on a
# blank virtio disk (txn_client.py run, ending with a CHECK of the disk against RAM).
#   Tools/guest-linux/smoke.sh [user|bridge] [SECONDS]
#     user   (default) QEMU user-mode network; UDP 7777 forwarded from 127.0.0.1:$HOSTPORT;
#            sink 10.0.2.2:$SINKPORT, which slirp delivers to 127.0.0.1:$SINKPORT on the host
#     bridge tap in a new bridge with one end of a veth pair whose other end (10.77.0.1/24) is
#            in a new network namespace; the guest is 10.77.0.2/24 (needs root)
#   SECONDS: how long to run the request/reply and sink checks (default 3)
# Env: OUT=dir with vmlinuz + initramfs.cpio.gz (default: run build.sh), QEMU=, EXTRA_APPEND=
# Everything it creates (QEMU, tap, bridge, veth, namespace, /dev/shm and /tmp files) is
# removed on exit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mode="${1:-user}"
secs="${2:-3}"
QEMU="${QEMU:-qemu-system-x86_64}"
command -v "$QEMU" >/dev/null || { echo "smoke: $QEMU not found; fix: apt-get install -y qemu-system-x86" >&2; exit 1; }

if [ -n "${OUT:-}" ]; then
  kernel="$OUT/vmlinuz"; initrd="$OUT/initramfs.cpio.gz"
else
  paths="$("$here/build.sh")"; kernel="$(sed -n 1p <<<"$paths")"; initrd="$(sed -n 2p <<<"$paths")"
fi

id=$$
ram="/dev/shm/gl-$id.ram"; serial="/tmp/gl-$id.serial"; qmp="/tmp/gl-$id.qmp"; disk="/tmp/gl-$id.disk"
br="glbr$id"; tap="gltap$id"; vh="glvh$id"; vn="glvn$id"; ns="gl$id"
qpid=""; sinkpid=""
cleanup() {
  [ -n "$sinkpid" ] && kill "$sinkpid" 2>/dev/null || true
  if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true; fi
  if [ "$mode" = bridge ]; then
    ip link del "$tap" 2>/dev/null || true
    ip link del "$vh" 2>/dev/null || true
    ip link del "$br" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  fi
  rm -f "$ram" "$serial" "$qmp" "$disk" "/tmp/gl-$id.replies"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sinkport=$((20000 + id % 20000)); hostport=$((40000 + id % 20000))
case "$mode" in
  user)
    gip=10.0.2.15; ask_host=127.0.0.1; ask_port=$hostport
    append="geminus.ip=$gip/24 geminus.gw=10.0.2.2 geminus.sink=10.0.2.2:$sinkport geminus.every_ms=100"
    net=(-netdev "user,id=n0,net=10.0.2.0/24,hostfwd=udp:127.0.0.1:$hostport-$gip:7777,hostfwd=tcp:127.0.0.1:$hostport-$gip:7000")
    txn=(python3 "$here/txn_client.py" run 127.0.0.1 "$hostport")
    sink=(python3 "$here/udp_check.py" sink 127.0.0.1 "$sinkport")
    ask=(python3 "$here/udp_check.py" ask "$ask_host" "$ask_port")
    ;;
  bridge)
    gip=10.77.0.2
    append="geminus.ip=$gip/24 geminus.sink=10.77.0.1:$sinkport geminus.every_ms=100"
    ip netns add "$ns"
    ip link add "$br" type bridge
    ip link set "$br" addrgenmode none 2>/dev/null || true
    ip tuntap add dev "$tap" mode tap
    ip link set "$tap" master "$br" up
    ip link add "$vh" type veth peer name "$vn"
    ip link set "$vh" master "$br" up
    ip link set "$vn" netns "$ns"
    ip -n "$ns" addr add 10.77.0.1/24 dev "$vn"
    ip -n "$ns" link set "$vn" up
    ip -n "$ns" link set lo up
    ip link set "$br" up
    net=(-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no")
    sink=(ip netns exec "$ns" python3 "$here/udp_check.py" sink 10.77.0.1 "$sinkport")
    ask=(ip netns exec "$ns" python3 "$here/udp_check.py" ask "$gip" 7777)
    txn=(ip netns exec "$ns" python3 "$here/txn_client.py" run "$gip" 7000)
    ;;
  *) echo "usage: smoke.sh [user|bridge] [SECONDS]" >&2; exit 2;;
esac

rm -f "$ram" "$serial"
truncate -s 16M "$disk"
t0=$(date +%s%N)
nice -n 5 "$QEMU" -accel tcg -machine pc,memory-backend=pc.ram -m 256 \
  -object "memory-backend-file,id=pc.ram,size=256M,mem-path=$ram,share=on" \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 ipv6.disable=1 $append ${EXTRA_APPEND:-}" \
  -nodefaults -display none -serial "file:$serial" \
  "${net[@]}" -device virtio-net-pci,netdev=n0 \
  -drive "file=$disk,if=virtio,format=raw,cache=none" \
  -qmp "unix:$qmp,server=on,wait=off" &
qpid=$!

addr=""
for _ in $(seq 1 1200); do
  addr="$(sed -n 's/^geminus-counter-phys=\(0x[0-9a-f]*\).*/\1/p' "$serial" 2>/dev/null | tail -n 1 || true)"
  [ -n "$addr" ] && break
  kill -0 "$qpid" 2>/dev/null || { echo "smoke: QEMU exited" >&2; exit 1; }
  sleep 0.05
done
[ -n "$addr" ] || { echo "smoke: no geminus-counter-phys line in 60 s" >&2; tail -20 "$serial" >&2; exit 1; }
t1=$(date +%s%N)
echo "boot: QEMU start to counter line $(( (t1 - t0) / 1000000 )) ms; $(grep '^geminus-init: up' "$serial")"
grep '^geminus-counter-phys=' "$serial"

"$here/read_counter.py" "$ram" "$addr" --rate 1
"$here/read_counter.py" "$ram" >/dev/null || { echo "smoke: magic scan did not find exactly one page" >&2; exit 1; }
python3 "$here/../guest-tiny/qmp.py" "$qmp" stop >/dev/null
"$here/read_counter.py" "$ram" "$addr" --still 1
python3 "$here/../guest-tiny/qmp.py" "$qmp" cont >/dev/null
"$here/read_counter.py" "$ram" "$addr" --rate 1

"${sink[@]}" "$((secs + 1))" & sinkpid=$!
"${ask[@]}" "$secs"
wait "$sinkpid"; sinkpid=""
"$here/read_counter.py" "$ram" "$addr"
grep '^geminus-txn:' "$serial"
"${txn[@]}" --seconds "$secs" --out "/tmp/gl-$id.replies" --disk-check
echo "smoke: OK ($mode)"
