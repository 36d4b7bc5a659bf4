#!/usr/bin/env bash
# Builds the preload library QEMU needs for Geminus write tracking (WriteTrackingFinder).
#   Tools/uffd-preload/build.sh [OUTPUT_DIR]   (default: .build/geminus-uffd-preload in the repo)
# Prints the absolute path of libgeminus-uffd-preload.so on stdout; everything else on stderr.
#
# The agent accepts the library (WriteTrackingPreload.locate) only from GEMINUS_UFFD_PRELOAD,
# /usr/local/lib/geminus/ or /usr/lib/geminus/, and only where root alone can change it (the file
# and every directory up to /): a build tree is never used. Install it with
#   sudo Tools/uffd-preload/install.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/.build/geminus-uffd-preload}"
CC="${CC:-gcc}"

die() { echo "uffd-preload: $*" >&2; exit 1; }
command -v "$CC" >/dev/null 2>&1 || die "C compiler '$CC' not found; fix: apt-get install -y gcc (or set CC=)"
mkdir -p "$out" || die "cannot create output directory '$out'"
out="$(cd "$out" && pwd)"

"$CC" -shared -fPIC -O2 -Wall -Wextra -Werror -std=gnu11 -fvisibility=hidden \
  -Wl,--build-id=none -Wl,-z,noexecstack -Wl,-z,now \
  -o "$out/libgeminus-uffd-preload.so.tmp" "$here/uffd_preload.c"
mv -f "$out/libgeminus-uffd-preload.so.tmp" "$out/libgeminus-uffd-preload.so"
echo "$out/libgeminus-uffd-preload.so"
