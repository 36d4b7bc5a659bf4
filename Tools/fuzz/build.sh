#!/usr/bin/env bash
# Builds the libFuzzer target for the frame decoder and the replica (with AddressSanitizer),
# and the seed-corpus writer, from GeminusCore's own sources. Output: Tools/fuzz/.out/
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$here/.out"
mkdir -p "$out/modules/CGeminusSupport"
cat > "$out/modules/CGeminusSupport/module.modulemap" <<MAP
module CGeminusSupport {
    header "$root/Sources/CGeminusSupport/include/geminus_support.h"
    export *
}
MAP
core=$(find "$root/Sources/GeminusCore" -name '*.swift' | sort)
common=(-parse-as-library -module-name GeminusFuzz -swift-version 6 -O
        -I "$root/Sources/CLZ4" -I "$root/Sources/CXXHash" -I "$out/modules/CGeminusSupport")
# The C helpers GeminusCore calls (support.c: page primitives; blockdev.c: the replica disk's
# ioctls and hole punching).
fuzz_objs=() plain_objs=()
for c in support blockdev; do
  clang -O1 -g -fsanitize=fuzzer-no-link,address -c "$root/Sources/CGeminusSupport/$c.c" \
    -I "$root/Sources/CGeminusSupport/include" -o "$out/$c-fuzz.o"
  clang -O2 -c "$root/Sources/CGeminusSupport/$c.c" -I "$root/Sources/CGeminusSupport/include" -o "$out/$c.o"
  fuzz_objs+=("$out/$c-fuzz.o")
  plain_objs+=("$out/$c.o")
done
swiftc "${common[@]}" -sanitize=fuzzer,address $core "$here/Harness.swift" "${fuzz_objs[@]}" \
  -llz4 -lxxhash -o "$out/fuzz-replica" 2> >(grep -v "Cannot export local symbol" >&2)
swiftc "${common[@]}" $core "$here/Harness.swift" "$here/MakeCorpus.swift" -D MAKE_CORPUS "${plain_objs[@]}" \
  -llz4 -lxxhash -o "$out/make-corpus"
# The wire target: GeminusCore, GeminusHypervisor and the files of other modules that parse
# untrusted input, in one module. Their `import GeminusCore`/`import GeminusHypervisor` lines
# are dropped from copies (the code is otherwise the real source, unchanged).
wire_src="$out/wire-src"
rm -rf "$wire_src" && mkdir -p "$wire_src"
for f in $(find "$root/Sources/GeminusHypervisor" -name '*.swift' | sort) \
         "$root/Sources/GeminusTransport/PeerHello.swift" \
         "$root/Sources/GeminusQEMU/GuestNIC.swift" "$root/Sources/GeminusQEMU/DeviceOutputPump.swift" \
         "$root/Sources/GeminusQEMU/UnixSocket.swift" "$root/Sources/GeminusQEMU/NBDExport.swift"; do
  sed -E '/^import Geminus(Core|Hypervisor)$/d' "$f" > "$wire_src/$(basename "$(dirname "$f")")-$(basename "$f")"
done
wire=$(find "$wire_src" -name '*.swift' | sort)
swiftc "${common[@]}" -sanitize=fuzzer,address $core $wire "$here/WireHarness.swift" "${fuzz_objs[@]}" \
  -llz4 -lxxhash -o "$out/fuzz-wire" 2> >(grep -v "Cannot export local symbol" >&2)
swiftc "${common[@]}" $core $wire "$here/WireHarness.swift" "$here/MakeWireCorpus.swift" -D MAKE_CORPUS "${plain_objs[@]}" \
  -llz4 -lxxhash -o "$out/make-wire-corpus"
# The link target: the pair link's production frame reader (GeminusTransport's FrameReader with
# its sealing, Crypto, Socket) and the witness's messages (GeminusAgent's WitnessMessage, with
# GeminusReplication for its records), the same way: copies without their `import Geminus*`.
link_src="$out/link-src"
rm -rf "$link_src" && mkdir -p "$link_src"
for f in $(find "$root/Sources/GeminusReplication" -name '*.swift' | sort) \
         "$root/Sources/GeminusTransport/FrameReader.swift" "$root/Sources/GeminusTransport/Crypto.swift" \
         "$root/Sources/GeminusTransport/SealedFrames.swift" "$root/Sources/GeminusTransport/Socket.swift" \
         "$root/Sources/GeminusAgent/WitnessMessage.swift"; do
  sed -E '/^import Geminus(Core|Replication)$/d' "$f" > "$link_src/$(basename "$(dirname "$f")")-$(basename "$f")"
done
link=$(find "$link_src" -name '*.swift' | sort)
swiftc "${common[@]}" -package-name geminus -I "$root/Sources/CLibCrypto" -sanitize=fuzzer,address $core $link \
  "$here/LinkHarness.swift" "${fuzz_objs[@]}" -llz4 -lxxhash -lcrypto -o "$out/fuzz-link" 2> >(grep -v "Cannot export local symbol" >&2)
echo "$out/fuzz-replica"
echo "$out/fuzz-wire"
echo "$out/fuzz-link"
