#if canImport(Glibc)
import Glibc
#endif
import GeminusCore

/// Frame I/O for the handshake: synchronous, on the caller's thread, every call bounded by
/// one deadline for the whole handshake.
struct HandshakeChannel {
    typealias Failure = FrameReader.Failure
    /// Handshake frames are a few hundred bytes; an unauthenticated peer gets no more.
    static let maxPayloadBytes = 64 << 10

    let socket: Socket
    let deadlineNanos: UInt64
    /// Keeps bytes read past the last handshake frame; the connection's reader continues with it.
    let reader: FrameReader

    init(socket: Socket, deadlineNanos: UInt64) {
        self.socket = socket
        self.deadlineNanos = deadlineNanos
        reader = FrameReader(fd: socket.fd)
        reader.maxPayloadBytes = Self.maxPayloadBytes
    }

    func read() throws(Failure) -> Frame {
        try reader.next(deadlineNanos: deadlineNanos)
    }

    /// Runs channel I/O, describing a failure the way the calling side wants it told.
    func io<T>(_ describe: (Failure) -> GeminusError,
               _ body: (HandshakeChannel) throws(Failure) -> T) throws(GeminusError) -> T {
        do {
            return try body(self)
        } catch {
            throw describe(error)
        }
    }

    func write(_ kind: FrameKind, generation: Generation, payload: [UInt8]) throws(Failure) {
        let frame = FrameCodec.encode(FrameHeader(kind: kind, generation: generation, epoch: .none), payload: payload)
        switch socket.sendAll(frame, deadlineNanos: deadlineNanos) {
        case .done: return
        case .timedOut: throw .timedOut
        case .endOfStream: throw .endOfStream
        case .failed(let e): throw e == EPIPE || e == ECONNRESET ? .endOfStream : .socket(e)
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
