// Writes the wire target's seed corpus: one valid input per target (a hello, a nack, a delta
// epoch with disk writes in the structured format, a NIC stream, an NBD session).
#if canImport(Glibc)
import Glibc
#endif

@main
struct MakeWireCorpus {
    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

    /// Frames in WireHarness's structured format (target 2).
    static func structured(_ frames: [[UInt8]]) -> [UInt8] {
        let kinds: [FrameKind] = [.epochBegin, .pages, .deviceState, .diskWrites, .epochEnd]
        var out: [UInt8] = [2]
        var d = FrameDecoder()
        for f in frames {
            d.feed(f)
            while let frame = try! d.next() {
                out += [UInt8(kinds.firstIndex(of: frame.kind)!)] + le(frame.epoch.rawValue) + le(frame.header.sequence) + [0]
                out += le(UInt16(frame.payload.count)) + frame.payload
            }
        }
        return out
    }

    static func diskEpoch(_ writes: [DiskWrite], full: Bool) -> [UInt8] {
        let buffer = CheckpointBuffer(limitPages: diskPages)
        buffer.isFull = full
        let page = [UInt8](repeating: full ? 0x5A : 0x11, count: GuestPage.size)
        page.withUnsafeBytes { raw in for p in 0..<(full ? diskPages : 1) { _ = buffer.appendPage(index: p, copying: raw.baseAddress!) } }
        buffer.deviceState = Array("dev".utf8)
        buffer.diskSizeBytes = 64 << 10
        buffer.diskWrites = writes
        let encoder = try! CheckpointEncoder(pageCount: diskPages, maxFramePayload: 16 << 10)
        var frames: [[UInt8]] = []
        _ = encoder.encode(buffer, epoch: Epoch(2), generation: Generation(1), baseEpoch: full ? .none : Epoch(1)) { frames.append($0) }
        return structured(frames)
    }

    static func nbdSession() -> [UInt8] {
        let name = Array("geminus".utf8)
        var s: [UInt8] = be(UInt32(3))
        s += be(UInt64(0x4948_4156_454f_5054)) + be(UInt32(7)) + be(UInt32(name.count + 6)) + be(UInt32(name.count)) + name + be(UInt16(0))
        func request(_ type: UInt16, _ handle: UInt64, _ offset: UInt64, _ length: UInt32) -> [UInt8] {
            be(UInt32(0x2560_9513)) + be(UInt16(0)) + be(type) + be(handle) + be(offset) + be(length)
        }
        s += request(1, 1, 4096, 8) + [UInt8](repeating: 0xAB, count: 8)
        s += request(6, 2, 0, 65536)
        s += request(0, 3, 0, 512)
        s += request(3, 4, 0, 0)
        s += request(2, 5, 0, 0)
        return s
    }

    static func main() {
        let dir = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "wire-corpus"
        mkdir(dir, 0o755)
        let hello = PeerHello(role: .primary, vmName: "web-1", generation: Generation(3), committedEpoch: Epoch(7),
                              guestPageCount: 262_144, agentVersion: "fuzz")
        var nic: [UInt8] = [3, 7]
        for n in [60, 1514, 0, 9000] { nic += be(UInt32(n)) + [UInt8](repeating: UInt8(truncatingIfNeeded: n), count: n) }
        nic += be(UInt32(70_000)) + [UInt8](repeating: 1, count: 100) 
        let files: [(String, [UInt8])] = [
            ("hello", [0] + (try! hello.encoded())),
            ("nack", [1] + Nack(reason: .badRecord, detail: "page 3 twice in one epoch").encoded()),
            ("disk-delta", diskEpoch([DiskWrite(offset: 8192, data: [UInt8](repeating: 3, count: 700)), .zeroes(offset: 0, length: 4096)], full: false)),
            ("disk-full", diskEpoch([DiskWrite(offset: 60 << 10, data: [UInt8](repeating: 9, count: 4096))], full: true)),
            ("nic", nic),
            ("nbd", [4] + nbdSession()),
        ]
        for (name, bytes) in files {
            let path = "\(dir)/seed-\(name)"
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            precondition(fd >= 0, "cannot write \(path)")
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        print("\(files.count) seeds in \(dir)")
    }
}
