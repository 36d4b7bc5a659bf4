#!/usr/bin/env bash
# Replays every input of the checked-in corpora once through the fuzz targets (a regression test
# for the decoder, the replica and the other wire inputs). Builds the targets first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build.sh" >/dev/null
"$here/.out/fuzz-replica" -runs=0 "$here/corpus" 2>&1 | tail -2
ASAN_OPTIONS=detect_leaks=0 "$here/.out/fuzz-wire" -runs=0 "$here/wire-corpus" 2>&1 | tail -2
ASAN_OPTIONS=detect_leaks=0 "$here/.out/fuzz-link" -runs=0 "$here/link-corpus" 2>&1 | tail -2
