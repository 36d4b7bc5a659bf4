#!/usr/bin/env bash
# Builds the Geminus Linux test guest: a Debian cloud kernel + a busybox initramfs whose
# workload keeps a counter in guest RAM and answers UDP (see README.md).
#   Tools/guest-linux/build.sh [OUTPUT_DIR]     (default: ./out beside this script)
# The last two lines on stdout are the absolute paths of the kernel and of the initramfs;
# everything else goes to stderr. Nothing is installed on the host: the .debs are fetched
# with `apt-get download` into OUTPUT_DIR/debs (kept; a second run needs no network) and
# unpacked with `dpkg-deb -x`. Rebuilding from the same .debs gives byte-identical files.
# Environment: CC (default gcc), KERNEL_PKG (default: what linux-image-cloud-amd64 depends on),
#              REFRESH=1 (ask apt for the current versions even if .debs are cached).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
CC="${CC:-gcc}"

die() { echo "guest-linux: $*" >&2; exit 1; }
log() { echo "guest-linux: $*" >&2; }

command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found; fix: run on Debian/Ubuntu (apt-get install -y dpkg)"
command -v python3 >/dev/null 2>&1 || die "python3 not found; fix: apt-get install -y python3"
command -v "$CC" >/dev/null 2>&1 || die "C compiler '$CC' not found; fix: apt-get install -y gcc (or set CC=)"

mkdir -p "$out/debs" || die "cannot create output directory '$out'"
out="$(cd "$out" && pwd)"
debs="$out/debs"
work="$out/work"

# --- static C probe (needs libc.a) -------------------------------------------------------
probe="$out/.static-probe"
if ! printf '#include <pthread.h>\nint main(void){return 0;}\n' |
     "$CC" -static -pthread -x c - -o "$probe" 2>"$probe.err"; then
  cat "$probe.err" >&2; rm -f "$probe" "$probe.err"
  die "'$CC -static' cannot link a static program; fix: apt-get install -y libc6-dev"
fi
rm -f "$probe" "$probe.err"

# --- fetch the .debs (only when not cached) ----------------------------------------------
newest() { ls -1 "$debs"/$1 2>/dev/null | sort -V | tail -n 1; }
fetch() {  # fetch PACKAGE...
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found and $debs lacks the .debs; fix: copy ${*}_*.deb into $debs"
  log "apt-get download $*"
  (cd "$debs" && apt-get -q -o APT::Sandbox::User=root download "$@" >&2) ||
    die "apt-get download $* failed; fix: apt-get update (and check network/sources.list), or copy the .debs into $debs"
}

if [ -n "${KERNEL_PKG:-}" ]; then
  kpkg="$KERNEL_PKG"
elif [ -z "${REFRESH:-}" ] && [ -n "$(newest 'linux-image-*-cloud-amd64_*.deb')" ]; then
  kpkg="$(basename "$(newest 'linux-image-*-cloud-amd64_*.deb')")"; kpkg="${kpkg%%_*}"
else
  command -v apt-cache >/dev/null 2>&1 || die "apt-cache not found; fix: set KERNEL_PKG= and put its .deb in $debs"
  kpkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
          awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ {print $2; exit}')"
  [ -n "$kpkg" ] || die "cannot resolve linux-image-cloud-amd64; fix: apt-get update (Debian 12 main must be in sources.list)"
fi
[ -n "${REFRESH:-}" ] || [ -z "$(newest "${kpkg}_*.deb")" ] || have_k=1
[ -n "${have_k:-}" ] || fetch "$kpkg"
[ -z "${REFRESH:-}" ] && [ -n "$(newest 'busybox-static_*.deb')" ] || fetch busybox-static
kdeb="$(newest "${kpkg}_*.deb")"; bdeb="$(newest 'busybox-static_*.deb')"
[ -f "$kdeb" ] || die "no ${kpkg}_*.deb in $debs after download"
[ -f "$bdeb" ] || die "no busybox-static_*.deb in $debs after download"
log "kernel: $(basename "$kdeb")"
log "busybox: $(basename "$bdeb")"

# --- unpack ------------------------------------------------------------------------------
rm -rf "$work"; mkdir -p "$work/k" "$work/bb"
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bdeb" "$work/bb"
vmlinuz="$(ls -1 "$work"/k/boot/vmlinuz-* | head -n 1)"
kver="${vmlinuz##*/vmlinuz-}"
moddir="$work/k/lib/modules/$kver"
[ -d "$moddir" ] || die "$kdeb has no lib/modules/$kver"
bb="$work/bb/bin/busybox"
[ -x "$bb" ] || die "$bdeb has no bin/busybox"
"$bb" --list-full > "$work/applets.txt" || die "cannot run the extracted busybox on this host"

# --- workload ----------------------------------------------------------------------------
"$CC" -static -O2 -Wall -Wextra -pthread -fno-asynchronous-unwind-tables \
  -Wl,--build-id=none -o "$work/geminus-guest" "$here/geminus-guest.c"
strip --strip-all "$work/geminus-guest" 2>/dev/null || true

# --- initramfs ---------------------------------------------------------------------------
python3 "$here/mkinitramfs.py" --busybox "$bb" --list "$work/applets.txt" \
  --modules-dir "$moddir" --module virtio_pci --module virtio_net --module virtio_blk \
  --file "$here/init:init:755" --file "$work/geminus-guest:bin/geminus-guest:755" \
  --out "$out/initramfs.cpio.gz"
cp -f "$vmlinuz" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$kver" > "$out/kernel-version"
rm -rf "$work"
log "initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes, sha256 $(sha256sum "$out/initramfs.cpio.gz" | cut -c1-16)"

echo "$out/vmlinuz"
echo "$out/initramfs.cpio.gz"
