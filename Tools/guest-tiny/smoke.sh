#!/usr/bin/env bash
# Boots the tiny guest under QEMU/TCG with its RAM in a shared file and checks it:
# serial counters increase, the status page counter grows, QMP stop freezes it, every work
# page then matches the guest's model, and cont resumes it; prints the loop rate.
# Cleans up QEMU and the RAM file on exit.
#   Tools/guest-tiny/smoke.sh [APPEND] [SECONDS]      e.g. smoke.sh "pages=500" 5
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
append="${1:-pages=64}"
secs="${2:-3}"
tag="gt-smoke-$$"
ram="/dev/shm/$tag.ram"
serial="/tmp/$tag.serial"
qmp="/tmp/$tag.qmp"

die() { echo "smoke: FAIL: $*" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null ||
  die "qemu-system-x86_64 not found; fix: apt-get install -y --no-install-recommends qemu-system-x86"

elf="$("$here/build.sh")"
qemu_pid=""
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
  rm -f "$ram" "$qmp" "$serial" "/tmp/$tag.log"
}
trap cleanup EXIT

qemu-system-x86_64 -accel tcg -machine pc -m 128 -nodefaults -display none \
  -kernel "$elf" -append "$append" \
  -chardev file,id=s0,path="$serial" -device isa-serial,chardev=s0 \
  -qmp unix:"$qmp",server=on,wait=off \
  -object memory-backend-file,id=pc.ram,size=128M,mem-path="$ram",share=on \
  -machine memory-backend=pc.ram 2>"/tmp/$tag.log" &
qemu_pid=$!

for _ in $(seq 50); do [ -S "$qmp" ] && python3 "$here/read_status.py" "$ram" >/dev/null 2>&1 && break; sleep 0.1; done
python3 "$here/read_status.py" "$ram" --verify || die "no valid status page"

python3 "$here/read_status.py" "$ram" --rate "$secs" || die "counter did not grow"
python3 "$here/read_status.py" "$ram" --verify >/dev/null || die "work pages inconsistent"

"$here/qmp.py" "$qmp" stop >/dev/null || die "QMP stop failed"
python3 "$here/read_status.py" "$ram" --still 1 >/dev/null || die "counter moved while stopped"
python3 "$here/read_status.py" "$ram" --exact | tail -1 || die "work area differs from the model"
"$here/qmp.py" "$qmp" cont >/dev/null || die "QMP cont failed"
python3 "$here/read_status.py" "$ram" --rate 1 >/dev/null || die "counter did not resume after cont"
echo "smoke: stop froze the counter for 1 s (work area exact), cont resumed it"

head -1 "$serial"
grep '^counter=' "$serial" | awk -F= 'NR>1 && $2<=prev {bad=1} {prev=$2; n++} END {
  if (n < 2 || bad) { print "smoke: FAIL: serial counters not increasing (" n " lines)"; exit 1 }
  print "smoke: " n " serial counter lines, increasing, last " prev }'
echo "smoke: OK"
