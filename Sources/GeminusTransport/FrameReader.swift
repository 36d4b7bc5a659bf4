#if canImport(Glibc)
import Glibc
#endif
import GeminusCore

/// Reads frames from a socket with as little copying as TCP allows.
///
/// Small frames (acks, heartbeats, handshake) arrive many per `recv` into a staging buffer.
/// A large frame's payload is received straight into the array the `Frame` will carry, so
/// each byte is touched once in user space (by the CRC) instead of three times (staging,
/// decoder buffer, payload copy) as with `FrameDecoder`. Loopback throughput is otherwise
/// bounded by those copies on the reader's core.
///
/// Validation is the core's `FrameCodec.parseHeader` for the header; then, during the
/// handshake, the documented CRC32C rule for the rest, and after it the frame's AES-GCM tag.
/// One thread at a time: the handshake's, then the connection's reader thread.
final class FrameReader: @unchecked Sendable {
    enum Failure: Error, Equatable {
        case frame(FrameError)
        case endOfStream
        case timedOut
        case socket(Int32)
    }

    static let stagingBytes = 32 << 10
    private static let magicBytes: [UInt8] = withUnsafeBytes(of: FrameHeader.magic.littleEndian) { Array($0) }

    private let fd: Int32
    private let staging: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0
    /// Frames larger than this are refused before their payload is read (the handshake
    /// allows an unauthenticated peer only small ones).
    var maxPayloadBytes = FrameHeader.maxPayloadBytes
    /// Called with the byte count after every successful `recv` (counters only: raw bytes
    /// prove nothing about the peer, so liveness is judged on authenticated frames).
    var onReceive: ((Int) -> Void)?
    /// Set once the handshake has agreed the keys: from then on only sealed frames are
    /// accepted, each opened under the next frame counter.
    var opener: AEADDirection?

    init(fd: Int32) {
        self.fd = fd
        staging = .allocate(byteCount: Self.stagingBytes, alignment: 16)
    }

    deinit { staging.deallocate() }

    /// The next verified frame. `deadlineNanos == .max` blocks in `recv` (the connection's
    /// reader thread, woken by `shutdown`); otherwise every wait is bounded.
    func next(deadlineNanos: UInt64 = .max) throws(Failure) -> Frame {
        while end - start < FrameHeader.size {
            try checkMagicPrefix()
            try fill(deadlineNanos: deadlineNanos)
        }
        let header: FrameHeader
        let crc: UInt32
        do throws(FrameError) {
            (header, crc) = try FrameCodec.parseHeader(UnsafeRawBufferPointer(rebasing: staging[start..<start + FrameHeader.size]))
        } catch {
            throw .frame(error)
        }
        let sealed = header.flags & FrameHeader.sealedFlag != 0
        guard sealed == (opener != nil) else { throw .frame(.sealingOutOfPlace(sealed: sealed)) }
        let length = Int(header.payloadLength)
        guard length <= maxPayloadBytes else { throw .frame(.payloadTooLarge(header.payloadLength)) }
        let headerBytes = Array(UnsafeRawBufferPointer(rebasing: staging[start..<start + FrameHeader.size]))
        let tagBytes = sealed ? FrameHeader.sealTagBytes : 0
        var payload: [UInt8]
        if FrameHeader.size + length + tagBytes <= Self.stagingBytes {
            if start + FrameHeader.size + length + tagBytes > Self.stagingBytes { compact() }
            while end - start < FrameHeader.size + length + tagBytes { try fill(deadlineNanos: deadlineNanos) }
            payload = Array(UnsafeRawBufferPointer(rebasing: staging[start + FrameHeader.size..<start + FrameHeader.size + length]))
            start += FrameHeader.size + length
        } else {
            payload = try receiveLargePayload(length, deadlineNanos: deadlineNanos)
        }
        if let opener {
            while end - start < tagBytes {
                if start + tagBytes > Self.stagingBytes { compact() }
                try fill(deadlineNanos: deadlineNanos)
            }
            let tag = UnsafeRawBufferPointer(rebasing: staging[start..<start + tagBytes])
            start += tagBytes
            let authentic = headerBytes.withUnsafeBytes { h in
                payload.withUnsafeMutableBytes { opener.open(associated: h, text: $0, tag: tag) }
            }
            guard authentic else {
                throw .frame(.unauthenticated(kind: header.kind.rawValue, epoch: header.epoch.rawValue, sequence: header.sequence))
            }
        } else {
            let running = CRC32C.checksum(payload, continuing: headerBytes.withUnsafeBytes { FrameCodec.headerChecksum($0) })
            guard running == crc else {
                throw .frame(.checksumMismatch(kind: header.kind.rawValue, epoch: header.epoch.rawValue, sequence: header.sequence))
            }
        }
        if start == end { start = 0; end = 0 }
        return Frame(header: header, payload: payload)
    }

    /// The staged part is copied; the rest is received in place. Bytes staged beyond the
    /// payload (the start of its tag) stay staged.
    private func receiveLargePayload(_ length: Int, deadlineNanos: UInt64) throws(Failure) -> [UInt8] {
        let staged = min(end - start - FrameHeader.size, length)
        var failure: Failure?
        let payload = [UInt8](unsafeUninitializedCapacity: length) { buffer, count in
            let raw = UnsafeMutableRawBufferPointer(buffer)
            raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: staging[start + FrameHeader.size..<start + FrameHeader.size + staged]))
            start += FrameHeader.size + staged
            if start == end { start = 0; end = 0 }
            var have = staged
            while have < length {
                let r = receive(into: UnsafeMutableRawBufferPointer(rebasing: raw[have..<length]), deadlineNanos: deadlineNanos)
                switch r {
                case .success(let n): have += n
                case .failure(let f):
                    failure = f
                    // Zero the rest so the array is initialised; it is discarded.
                    UnsafeMutableRawBufferPointer(rebasing: raw[have..<length]).initializeMemory(as: UInt8.self, repeating: 0)
                    have = length
                }
            }
            count = length
        }
        if let failure { throw failure }
        return payload
    }

    private func compact() {
        let n = end - start
        if n > 0 && start > 0 {
            UnsafeMutableRawBufferPointer(rebasing: staging[0..<n])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: staging[start..<end]))
        }
        start = 0
        end = n
    }

    private func fill(deadlineNanos: UInt64) throws(Failure) {
        if end == Self.stagingBytes { compact() }
        switch receive(into: UnsafeMutableRawBufferPointer(rebasing: staging[end..<Self.stagingBytes]), deadlineNanos: deadlineNanos) {
        case .success(let n): end += n
        case .failure(let f): throw f
        }
    }

    /// A peer that is not a Geminus agent (a browser, `curl`) often sends fewer than 40 bytes
    /// and waits; the first bytes already tell, so it is refused at once rather than at the
    /// handshake timeout.
    private func checkMagicPrefix() throws(Failure) {
        let n = min(end - start, 4)
        guard n > 0 else { return }
        var seen: UInt32 = 0
        var matches = true
        for i in 0..<n {
            let b = staging[start + i]
            seen |= UInt32(b) << (8 * UInt32(i))
            if b != Self.magicBytes[i] { matches = false }
        }
        if !matches { throw .frame(.badMagic(seen)) }
    }

    private func receive(into buffer: UnsafeMutableRawBufferPointer, deadlineNanos: UInt64) -> Result<Int, Failure> {
        while true {
            let flags = deadlineNanos == .max ? Int32(0) : Int32(MSG_DONTWAIT)
            let n = recv(fd, buffer.baseAddress, buffer.count, flags)
            if n > 0 {
                onReceive?(n)
                return .success(n)
            }
            if n == 0 { return .failure(.endOfStream) }
            let e = errno
            switch e {
            case EINTR:
                continue
            case EAGAIN where deadlineNanos != .max:
                switch pollDescriptor(fd, Int16(POLLIN), deadlineNanos: deadlineNanos) {
                case .timedOut: return .failure(.timedOut)
                case .failed(let pe): return .failure(.socket(pe))
                default: continue
                }
            case ECONNRESET:
                return .failure(.endOfStream)
            default:
                return .failure(.socket(e))
            }
        }
    }
}
