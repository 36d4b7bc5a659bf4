import GeminusCore
import Logging

/// One authenticated TCP connection to the peer agent, carrying frames both ways, each sealed
/// with the session keys the handshake agreed (docs/PROTOCOL.md, "Sealed frames").
///
/// Sending and receiving never touch the socket: a writer thread drains a bounded outbound
/// queue (many frames per syscall) and sends heartbeats when idle; a reader thread decodes
/// into a bounded inbound queue and swallows heartbeats. Blocking socket I/O thus stays off
/// Swift's cooperative thread pool, and the two bounds give backpressure end to end.
public final class FramedConnection: @unchecked Sendable {
    /// What the peer said about itself in the handshake.
    public let peer: PeerHello
    /// What this agent said about itself.
    public let local: PeerHello
    /// "host:port" of the peer, for messages.
    public let remoteAddress: String
    private let link: Link

    init(socket: Socket, handshake: Handshake.Outcome, local: PeerHello, remoteAddress: String,
         options: LinkOptions, logger: Logger) {
        self.local = local
        self.peer = handshake.peer
        self.remoteAddress = remoteAddress
        socket.setNoDelay()
        link = Link(socket: socket, remoteAddress: remoteAddress, heartbeatGeneration: local.generation,
                    keys: handshake.keys, options: options, logger: logger)
        link.start(reader: handshake.reader)
    }

    deinit {
        link.close(.closedLocally)
    }

    /// Queues one encoded frame (from `FrameCodec.encode`). Blocks while the outbound queue is
    /// over its limit; `.timeout` if no room was made in time, `.connectionFailed` once closed.
    public func send(_ frameBytes: [UInt8], timeout: Duration) throws(GeminusError) {
        switch link.outbound.enqueue(frameBytes, deadlineNanos: timeout.deadlineFromNow) {
        case .queued:
            return
        case .timedOut:
            throw GeminusError(.timeout, "sending to \(remoteAddress) timed out after \(timeout.millisDescription): the peer is not reading fast enough (\(link.outbound.counters.queuedBytes) bytes queued)")
        case .closed:
            throw closedError
        }
    }

    /// The next frame other than a heartbeat, or nil if none arrived in time. Once the
    /// connection has ended (and every frame that arrived before has been handed out) it
    /// throws; `closeReason` says why.
    public func receive(timeout: Duration) throws(GeminusError) -> Frame? {
        switch link.inbound.pop(deadlineNanos: timeout.deadlineFromNow) {
        case .frame(let f): return f
        case .timedOut: return nil
        case .closed: throw closedError
        }
    }

    /// Waits until every queued frame has been handed to the kernel (for example a last nack
    /// before `close()`).
    public func flush(timeout: Duration) throws(GeminusError) {
        if link.outbound.waitUntilEmpty(deadlineNanos: timeout.deadlineFromNow) { return }
        if link.closeReason != nil { throw closedError }
        throw GeminusError(.timeout, "flushing to \(remoteAddress) timed out after \(timeout.millisDescription)")
    }

    /// Idempotent; wakes every blocked `send` and `receive`. Queued frames are dropped.
    public func close() {
        link.close(.closedLocally)
    }

    public var isOpen: Bool { link.closeReason == nil }

    /// nil while open.
    public var closeReason: ConnectionClosed? { link.closeReason }

    /// CLOCK_MONOTONIC nanoseconds (GeminusCore `Monotonic.nanos()`) when bytes last arrived.
    public var lastHeardNanos: UInt64 { link.lastHeardNanos.load(ordering: .relaxed) }

    public var stats: LinkStats {
        var s = LinkStats()
        s.bytesSent = link.bytesSent.load(ordering: .relaxed)
        s.bytesReceived = link.bytesReceived.load(ordering: .relaxed)
        s.framesSent = link.framesSent.load(ordering: .relaxed)
        s.framesReceived = link.framesReceived.load(ordering: .relaxed)
        s.heartbeatsSent = link.heartbeatsSent.load(ordering: .relaxed)
        s.heartbeatsReceived = link.heartbeatsReceived.load(ordering: .relaxed)
        let out = link.outbound.counters
        s.queuedBytes = out.queuedBytes
        s.sendWaits = out.sendWaits
        s.inboundQueuedBytes = link.inbound.queuedByteCount
        return s
    }

    private var closedError: GeminusError {
        (link.closeReason ?? .closedLocally).error(remote: remoteAddress)
    }
}
