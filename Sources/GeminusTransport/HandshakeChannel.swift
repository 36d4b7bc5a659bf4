#if canImport(Glibc)
import Glibc
#endif
import GeminusCore

/// Frame I/O for the handshake: synchronous, on the caller's thread, every call bounded by
/// one deadline for the whole handshake.
struct HandshakeChannel {
    enum Failure: Error {
        case timedOut
        case closed
        case socket(Int32)
        case frame(FrameError)
    }

    let socket: Socket
    let deadlineNanos: UInt64
    /// Keeps bytes read past the last handshake frame; the connection's reader continues with it.
    private(set) var decoder = FrameDecoder()
    /// The stream's first bytes. The decoder needs a whole 40-byte header before it can say
    /// "bad magic", and a client such as `curl` sends less and then waits for an answer.
    private var streamPrefix: [UInt8] = []
    private static let magicBytes: [UInt8] = withUnsafeBytes(of: FrameHeader.magic.littleEndian) { Array($0) }

    init(socket: Socket, deadlineNanos: UInt64) {
        self.socket = socket
        self.deadlineNanos = deadlineNanos
    }

    mutating func read() throws(Failure) -> Frame {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            do {
                if let f = try decoder.next() { return f }
            } catch {
                throw .frame(error)
            }
            let r = chunk.withUnsafeMutableBytes { socket.receive(into: $0, deadlineNanos: deadlineNanos) }
            switch r {
            case .done(let n):
                try checkPrefix(chunk[0..<n])
                decoder.feed(Array(chunk[0..<n]))
            case .endOfStream: throw .closed
            case .timedOut: throw .timedOut
            case .failed(let e): throw e == ECONNRESET ? .closed : .socket(e)
            }
        }
    }

    private mutating func checkPrefix(_ bytes: ArraySlice<UInt8>) throws(Failure) {
        guard streamPrefix.count < 4 else { return }
        streamPrefix.append(contentsOf: bytes.prefix(4 - streamPrefix.count))
        guard streamPrefix.elementsEqual(Self.magicBytes.prefix(streamPrefix.count)) else {
            var padded = streamPrefix + [UInt8](repeating: 0, count: 4 - streamPrefix.count)
            let seen = padded.withUnsafeMutableBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
            throw .frame(.badMagic(seen))
        }
    }

    /// Runs channel I/O, describing a failure the way the calling side wants it told.
    mutating func io<T>(_ describe: (Failure) -> GeminusError,
                        _ body: (inout HandshakeChannel) throws(Failure) -> T) throws(GeminusError) -> T {
        do {
            return try body(&self)
        } catch {
            throw describe(error)
        }
    }

    func write(_ kind: FrameKind, generation: Generation, payload: [UInt8]) throws(Failure) {
        let frame = FrameCodec.encode(FrameHeader(kind: kind, generation: generation, epoch: .none), payload: payload)
        switch socket.sendAll(frame, deadlineNanos: deadlineNanos) {
        case .done: return
        case .timedOut: throw .timedOut
        case .endOfStream: throw .closed
        case .failed(let e): throw e == EPIPE || e == ECONNRESET ? .closed : .socket(e)
        }
    }

    /// After a refusal: stop sending but keep reading (briefly) what the peer still sends.
    /// Closing with unread bytes makes the kernel answer with a reset, which can overtake the
    /// refusal and leave the peer with "connection reset" instead of the reason.
    func linger(maxNanos: UInt64 = 100_000_000) {
        _ = Glibc.shutdown(socket.fd, Int32(SHUT_WR))
        let until = min(deadlineNanos, Monotonic.nanos() &+ maxNanos)
        var sink = [UInt8](repeating: 0, count: 4096)
        var drained = 0
        while drained < 1 << 20 {
            let r = sink.withUnsafeMutableBytes { socket.receive(into: $0, deadlineNanos: until) }
            guard case .done(let n) = r else { break }
            drained += n
        }
    }
}
