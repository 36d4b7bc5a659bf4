// libFuzzer target for the pair link's production frame reader (issue 18): `FrameReader` from
// Sources/GeminusTransport, over a real socketpair, in both of its modes, and the witness's
// messages (`WitnessMessage`, the JSON carried over Corosync). Built by Tools/fuzz/build.sh
// from the real sources compiled into one module.
//
// Input: first byte picks the target (mod 3), the rest is that target's input.
//   0 handshake mode: raw bytes for a reader that has no keys yet (CRC32C frames, 64 KiB cap).
//   1 sealed mode: records `op u8, kind u8, epoch u64, len u16, payload`, which the harness
//     seals with the connection's key and then may tamper with (op % 5: 0 sealed honestly,
//     1 a byte flipped, 2 the bytes sent in the clear, 3 the previous sealed frame replayed,
//     4 dropped). The reader must hand out exactly the honest frames before the first tampered
//     one, byte for byte, and nothing after it: a forged, altered, replayed, reordered or
//     dropped frame is never delivered.
//   2 witness message: the JSON bytes.
#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Writes `wire` into one end of a socketpair (closing it after) and reads frames from the
/// other with `reader` until the stream ends or fails.
func readAll(_ wire: [UInt8], configure: (FrameReader) -> Void) -> (frames: [Frame], failure: FrameReader.Failure?) {
    var fds: [Int32] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { preconditionFailure("socketpair: \(errno)") }
    var size: Int32 = 4 << 20
    setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    setsockopt(fds[1], SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    defer { close(fds[1]) }
    // A writer thread, so inputs larger than the socket buffers cannot block the harness.
    let writerFD = fds[0]
    let writer = Thread {
        var sent = 0
        while sent < wire.count {
            let n = wire.withUnsafeBytes { send(writerFD, $0.baseAddress! + sent, wire.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += n
        }
        close(writerFD)
    }
    writer.start()
    let reader = FrameReader(fd: fds[1])
    configure(reader)
    var frames: [Frame] = []
    while true {
        do throws(FrameReader.Failure) {
            let f = try reader.next(deadlineNanos: Monotonic.nanos() + 2_000_000_000)
            precondition(f.payload.count == Int(f.header.payloadLength), "reader: payload length differs from the header's")
            precondition(f.payload.count <= reader.maxPayloadBytes, "reader: payload over the limit handed out")
            frames.append(f)
        } catch {
            precondition(error != .timedOut, "reader: waited for bytes that were never sent")
            return (frames, error)
        }
    }
}

// MARK: - 0: handshake mode

func fuzzHandshakeReader(_ bytes: [UInt8]) {
    let (frames, _) = readAll(bytes) { $0.maxPayloadBytes = 64 << 10 }
    for f in frames {
        precondition(f.header.flags & FrameHeader.sealedFlag == 0, "reader: a sealed frame accepted during the handshake")
    }
}

// MARK: - 1: sealed mode

let linkKey = [UInt8](repeating: 0x42, count: AEADDirection.keyBytes)
let allKinds = FrameKind.allCases

func fuzzSealedReader(_ bytes: [UInt8]) {
    var input = ByteReader(bytes)
    let sealer = AEADDirection(key: linkKey, encrypting: true)
    var wire: [UInt8] = []
    var honest: [(FrameHeader, [UInt8])] = []
    var tampered = false
    var previous: [UInt8]?
    while honest.count < 64, let op = input.u8(), let kind = input.u8(), let epoch = input.u64(), let length = input.u16() {
        let payload = Array(input.take(min(Int(length % 4096), input.remaining)) ?? [])
        let header = FrameHeader(kind: allKinds[Int(kind) % allKinds.count], generation: Generation(1), epoch: Epoch(epoch))
        var frame = FrameCodec.encode(header, payload: payload)
        switch op % 5 {
        case 0:
            let tag = FrameSeal.seal(&frame, with: sealer)
            previous = frame + tag
            wire += frame + tag
            if !tampered { honest.append((header, payload)) }
        case 1:
            let tag = FrameSeal.seal(&frame, with: sealer)
            var sealed = frame + tag
            let at = Int(epoch % UInt64(sealed.count))
            sealed[at] ^= UInt8(1 << (length % 8))
            wire += sealed
            tampered = true
        case 2:
            wire += frame
            tampered = true
        case 3:
            guard let p = previous else { continue }
            wire += p
            tampered = true
        default:
            _ = FrameSeal.seal(&frame, with: sealer)
            tampered = true
        }
    }
    let (frames, _) = readAll(wire) { $0.opener = AEADDirection(key: linkKey, encrypting: false) }
    precondition(frames.count <= honest.count, "reader: delivered \(frames.count) frames, only \(honest.count) were sealed honestly before any tampering")
    if !tampered { precondition(frames.count == honest.count, "reader: lost honest frames (\(frames.count) of \(honest.count))") }
    for (f, (h, p)) in zip(frames, honest) {
        precondition(f.kind == h.kind && f.epoch == h.epoch && f.payload == p, "reader: delivered a frame that was not sent as it is")
    }
}

// MARK: - 2: witness messages

func fuzzWitnessMessage(_ bytes: [UInt8]) {
    guard let m = WitnessMessage(decoding: bytes) else { return }
    switch m {
    case .agent(_, let record, let stopped):
        if let r = record { _ = r.generation.next; _ = r.unprotectedAfter.next }
        _ = stopped?.next
    case .witness(let records, let stopped):
        precondition(records.count <= WitnessMessage.maxRecords && stopped.count <= WitnessMessage.maxRecords, "witness: more records than allowed")
        for r in records.values { _ = r.generation.next; _ = r.unprotectedAfter.next }
        for g in stopped.values { _ = g.next }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzLink(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    switch data[0] % 3 {
    case 0: fuzzHandshakeReader(bytes)
    case 1: fuzzSealedReader(bytes)
    default: fuzzWitnessMessage(bytes)
    }
    return 0
}
