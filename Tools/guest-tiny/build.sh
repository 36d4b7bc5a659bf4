#!/usr/bin/env bash
# Builds the Geminus tiny multiboot test guest.
#   Tools/guest-tiny/build.sh [OUTPUT_DIR]     (default: ./out beside this script)
# Prints the absolute path of guest.elf on stdout; everything else goes to stderr.
# Rebuilding with unchanged sources gives the same file (no timestamps or build ids).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
CC="${CC:-gcc}"
LD="${LD:-ld}"

die() { echo "guest-tiny: $*" >&2; exit 1; }

command -v "$CC" >/dev/null 2>&1 ||
  die "C compiler '$CC' not found; fix: apt-get install -y gcc (or set CC=)"
command -v "$LD" >/dev/null 2>&1 ||
  die "linker '$LD' not found; fix: apt-get install -y binutils (or set LD=)"
"$LD" -V 2>/dev/null | grep -q elf_i386 ||
  die "'$LD' cannot link 32-bit x86 (no elf_i386 emulation); fix: use GNU ld for x86 (binutils)"

mkdir -p "$out" || die "cannot create output directory '$out'"
out="$(cd "$out" && pwd)"

CFLAGS=(-m32 -march=i686 -ffreestanding -nostdlib -fno-pic -fno-pie -O2
        -fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables
        -fno-tree-loop-distribute-patterns -mgeneral-regs-only -mno-red-zone
        -Wall -Wextra -std=gnu11)

probe="$out/.m32-probe"
if ! echo 'int probe(void){return 0;}' | "$CC" "${CFLAGS[@]}" -x c -c - -o "$probe.o" 2>"$probe.err"; then
  cat "$probe.err" >&2
  die "'$CC -m32' cannot compile 32-bit code; fix: apt-get install -y gcc-multilib"
fi
rm -f "$probe.o" "$probe.err"

"$CC" "${CFLAGS[@]}" -c "$here/start.S" -o "$out/start.o"
"$CC" "${CFLAGS[@]}" -c "$here/guest.c" -o "$out/guest.o"
"$LD" -m elf_i386 -nostdlib --build-id=none -z noexecstack -T "$here/link.ld" \
  -o "$out/guest.elf.tmp" "$out/start.o" "$out/guest.o"
mv -f "$out/guest.elf.tmp" "$out/guest.elf"

echo "$out/guest.elf"
