#!/usr/bin/env bash
# Replays every input of the checked-in corpus once through the fuzz target (a regression test
# for the decoder and replica). Builds the target first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build.sh" >/dev/null
"$here/.out/fuzz-replica" -runs=0 "$here/corpus" 2>&1 | tail -2
