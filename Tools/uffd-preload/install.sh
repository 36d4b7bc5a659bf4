#!/usr/bin/env bash
# Builds the write-tracking preload library and installs it where the agent accepts it:
#   sudo Tools/uffd-preload/install.sh      -> /usr/local/lib/geminus/libgeminus-uffd-preload.so
# Prints the installed path on stdout; everything else on stderr.
#
# Why there: QEMU loads the library into every protected guest (as root with --guest qemu), and
# `geminus enroll --prepare` writes its path into the domain's definition. The agent therefore
# accepts it only where only root can change it: the file and every directory up to / owned by
# root and not writable by group or others (WriteTrackingPreload.checkTrusted). Mode 0644 and
# directories 0755, so libvirt's QEMU user (libvirt-qemu, qemu) can read it, which it cannot do
# from a build tree inside a 0700 home or mktemp directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest=/usr/local/lib/geminus
name=libgeminus-uffd-preload.so

die() { echo "uffd-preload install: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (the library must be root's alone); fix: sudo $0"

built="$("$here/build.sh")"
install -d -o root -g root -m 0755 "$dest"
# Through a temporary name: a QEMU starting meanwhile never loads a half-written file.
install -o root -g root -m 0644 "$built" "$dest/.$name.tmp"
mv -f "$dest/.$name.tmp" "$dest/$name"
# Every directory above must be root's and not group/other-writable, or the agent refuses it.
dir="$dest"
while [ "$dir" != "/" ]; do
  dir="$(dirname "$dir")"
  read -r owner mode < <(stat -c '%u %a' "$dir")
  [ "$owner" = 0 ] || die "$dir belongs to uid $owner, not root: the agent will refuse $dest/$name; fix: chown root $dir"
  (( (8#$mode & 8#022) == 0 )) || die "$dir is writable by group or others (mode $mode): the agent will refuse $dest/$name; fix: chmod go-w $dir"
done
echo "$dest/$name"
