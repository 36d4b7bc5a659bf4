// Writes the seed corpus: valid epochs in the harness's structured format (full epochs and
// deltas on the base image, every page encoding), plus raw-mode streams.
#if canImport(Glibc)
import Glibc
#endif

@main
struct MakeCorpus {
    static func structured(_ frames: [[UInt8]]) -> [UInt8] {
        var out: [UInt8] = [1]
        var d = FrameDecoder()
        for f in frames {
            d.feed(f)
            while let frame = try! d.next() {
                out += [frame.kind.rawValue &- 0x10, UInt8(truncatingIfNeeded: frame.epoch.rawValue), UInt8(truncatingIfNeeded: frame.header.sequence),
                        UInt8(truncatingIfNeeded: frame.generation.rawValue)]
                let n = UInt16(frame.payload.count)
                out += [UInt8(n & 0xFF), UInt8(n >> 8)]
                out += frame.payload
            }
        }
        return out
    }

    static func main() {
        let dir = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "corpus"
        mkdir(dir, 0o755)
        var files: [(String, [UInt8])] = []
        // Deltas on the base image: small edits (XOR), a zeroed page, an unchanged page, a
        // rewritten page (LZ4 or raw), and the device state.
        let encoder = try! CheckpointEncoder(pageCount: fuzzPages, maxFramePayload: 16 << 10)
        let base = CheckpointBuffer(limitPages: fuzzPages)
        base.isFull = true
        baseImage.withUnsafeBytes { raw in
            for p in 0..<fuzzPages { _ = base.appendPage(index: p, copying: raw.baseAddress! + p * GuestPage.size) }
        }
        base.deviceState = Array("device-state".utf8)
        _ = encoder.encode(base, epoch: Epoch(1), generation: Generation(1), baseEpoch: .none) { _ in }
        var image = baseImage
        for e in 2...4 {
            let delta = CheckpointBuffer(limitPages: fuzzPages)
            for p in [1, 2, 4, 5, 7, 8] {
                let o = p * GuestPage.size
                switch (p + e) % 4 {
                case 0: for i in 0..<8 { image[o + 64 + i] &+= UInt8(e) }
                case 1: for i in 0..<GuestPage.size { image[o + i] = 0 }
                case 2: break
                default: for i in 0..<GuestPage.size { image[o + i] = UInt8(truncatingIfNeeded: i &* (e + p) &* 2654435761 >> 13) }
                }
                image.withUnsafeBytes { _ = delta.appendPage(index: p, copying: $0.baseAddress! + o) }
            }
            delta.deviceState = Array("state-\(e)".utf8)
            var frames: [[UInt8]] = []
            _ = encoder.encode(delta, epoch: Epoch(UInt64(e)), generation: Generation(1), baseEpoch: Epoch(UInt64(e - 1))) { frames.append($0) }
            files.append(("delta-\(e)", structured(frames)))
            files.append(("raw-delta-\(e)", [0] + frames.flatMap { $0 }))
        }
        var full: [[UInt8]] = []
        _ = encoder.encode(base, epoch: Epoch(9), generation: Generation(1), baseEpoch: .none) { full.append($0) }
        files.append(("full-9", structured(full)))
        for (name, bytes) in files {
            let path = "\(dir)/\(name)"
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        print("wrote \(files.count) seed inputs to \(dir)")
    }
}
