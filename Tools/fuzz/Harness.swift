// libFuzzer target for the secondary's untrusted-input path: the frame decoder and the
// replica's stage/verify/apply logic (promise S3). Built by Tools/fuzz/build.sh together with
// GeminusCore's sources into one module, so it calls the real code, not a copy.
//
// Input format. First byte: 0 = raw bytes for FrameDecoder; anything else = structured frames,
// each `kind u8, epoch u8, sequence u8, generation u8, length u16 LE, payload[length]`, which
// the harness seals with a valid CRC32C, so mutations reach past the checksum into the
// replica. The replica starts with a committed full epoch 1 of a known 16-page guest, so
// deltas on it can commit.
#if canImport(Glibc)
import Glibc
#endif

let fuzzPages = 16

/// The committed starting state every input begins from.
let baseImage: [UInt8] = {
    var image = [UInt8](repeating: 0, count: fuzzPages * GuestPage.size)
    for p in 1..<fuzzPages where p % 3 != 0 {
        for i in 0..<GuestPage.size { image[p * GuestPage.size + i] = UInt8(truncatingIfNeeded: (p &* 31) ^ (i & 0x3F)) }
    }
    return image
}()

/// Encodes a full epoch 1 of `baseImage` and returns its frames, for the starting state.
func baseEpochFrames() -> [[UInt8]] {
    let buffer = CheckpointBuffer(limitPages: fuzzPages)
    buffer.isFull = true
    baseImage.withUnsafeBytes { raw in
        for p in 0..<fuzzPages { _ = buffer.appendPage(index: p, copying: raw.baseAddress! + p * GuestPage.size) }
    }
    buffer.deviceState = Array("device-state".utf8)
    let encoder = try! CheckpointEncoder(pageCount: fuzzPages, maxFramePayload: 16 << 10)
    var frames: [[UInt8]] = []
    _ = encoder.encode(buffer, epoch: Epoch(1), generation: Generation(1), baseEpoch: .none) { frames.append($0) }
    return frames
}

let baseFrames = baseEpochFrames()

func freshReplica() -> Replica {
    let replica = Replica(memory: try! PageMemory(pageCount: fuzzPages), generation: Generation(1))
    var d = FrameDecoder()
    for f in baseFrames {
        d.feed(f)
        while let frame = try! d.next() { _ = replica.accept(frame) }
    }
    precondition(replica.committedEpoch == Epoch(1), "harness: base epoch did not commit")
    return replica
}

/// A digest of the replica's memory. XXH3 runs in the uninstrumented library: comparing
/// 64 KiB snapshots byte by byte in instrumented Swift made each input take 6 ms.
func snapshot(_ r: Replica) -> UInt64 {
    var d = ContentDigest()
    d.add(UnsafeRawBufferPointer(start: r.memory.base, count: r.memory.byteCount))
    return d.value
}

/// Feeds one frame and checks S3: only a commit may change the replica, and a commit moves
/// the epoch forward.
func feed(_ replica: Replica, _ frame: Frame) {
    guard frame.kind.isCheckpointFrame else { return }
    let before = snapshot(replica)
    let epochBefore = replica.committedEpoch
    let stateBefore = replica.committedDeviceState
    switch replica.accept(frame) {
    case .committed(let e, _):
        precondition(e > epochBefore && replica.committedEpoch == e, "S3: commit did not move the epoch forward")
    case .staged, .rejected, .ignored:
        precondition(replica.committedEpoch == epochBefore, "S3: epoch changed without a commit")
        precondition(snapshot(replica) == before, "S3: replica memory changed without a commit")
        precondition(replica.committedDeviceState == stateBefore, "S3: device state changed without a commit")
    }
}

extension FrameKind {
    var isCheckpointFrame: Bool { self == .epochBegin || self == .pages || self == .deviceState || self == .epochEnd }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = Array(UnsafeBufferPointer(start: data, count: size))
    guard let mode = input.first else { return 0 }
    let replica = freshReplica()
    if mode == 0 {
        var decoder = FrameDecoder()
        decoder.feed(Array(input.dropFirst()))
        do {
            while let frame = try decoder.next() { feed(replica, frame) }
        } catch {
            if case .checksumMismatch(_, let e, _) = error {
                let before = snapshot(replica)
                _ = replica.noteCorruptFrame(epoch: Epoch(e))
                precondition(snapshot(replica) == before, "S3: a corrupt frame changed the replica")
            }
        }
        return 0
    }
    var r = ByteReader(input, offset: 1)
    while let kindByte = r.u8(), let epoch = r.u8(), let sequence = r.u8(), let generation = r.u8(), let length = r.u16() {
        let payload = Array(r.take(min(Int(length), r.remaining)) ?? [])
        // Map any byte onto a checkpoint kind so few inputs are wasted.
        let kinds: [FrameKind] = [.epochBegin, .pages, .deviceState, .epochEnd]
        let kind = kinds[Int(kindByte) % kinds.count]
        let header = FrameHeader(kind: kind, generation: Generation(UInt64(generation % 3)), epoch: Epoch(UInt64(epoch)),
                                 sequence: UInt32(sequence))
        var d = FrameDecoder()
        d.feed(FrameCodec.encode(header, payload: payload))
        guard let frame = try? d.next() else { preconditionFailure("harness: a sealed frame did not decode") }
        feed(replica, frame)
    }
    return 0
}
