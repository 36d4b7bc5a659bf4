import GeminusCore

/// Tunables of one connection. The defaults suit a LAN pair; tests shrink the limits.
public struct LinkOptions: Sendable {
    /// Frames the sender may queue before `send` blocks (backpressure).
    public var outboundLimitBytes: Int
    /// Frames received but not yet taken by `receive`; when full the reader stops reading and
    /// TCP flow control slows the peer down.
    public var inboundLimitBytes: Int
    /// Sent when nothing else was sent for this long (docs/PROTOCOL.md, "Heartbeats").
    public var heartbeatInterval: Duration
    /// Bound on the listening side's handshake, so a silent client cannot hold the acceptor.
    public var handshakeTimeout: Duration
    /// Off only in `geminus bench`, to measure what sealing costs against the same link in
    /// the clear; both ends must agree. Not reachable from any agent option: protocol v2
    /// has no unsealed mode.
    package var sealFrames = true

    public init(outboundLimitBytes: Int = 64 << 20, inboundLimitBytes: Int = 64 << 20,
                heartbeatInterval: Duration = .milliseconds(10), handshakeTimeout: Duration = .seconds(2)) {
        self.outboundLimitBytes = outboundLimitBytes
        self.inboundLimitBytes = inboundLimitBytes
        self.heartbeatInterval = heartbeatInterval
        self.handshakeTimeout = handshakeTimeout
    }
}

/// Counters of one connection since its handshake completed.
public struct LinkStats: Sendable, Equatable {
    /// Every byte written to / read from the socket after the handshake, heartbeats included.
    public var bytesSent: UInt64 = 0
    public var bytesReceived: UInt64 = 0
    /// Frames given to `send` that reached the socket / frames `receive` can hand out;
    /// heartbeats generated and swallowed by the connection are not counted here.
    public var framesSent: UInt64 = 0
    public var framesReceived: UInt64 = 0
    public var heartbeatsSent: UInt64 = 0
    public var heartbeatsReceived: UInt64 = 0
    /// Bytes waiting to be written (queued or being written).
    public var queuedBytes: Int = 0
    /// Bytes received and decoded but not yet taken by `receive`.
    public var inboundQueuedBytes: Int = 0
    /// Calls to `send` that found the queue full and had to wait.
    public var sendWaits: UInt64 = 0

    public init() {}
}

/// Why a connection ended. `receive` turns it into a `GeminusError`; callers that must act on
/// the cause (a corrupt frame is a rejected epoch, not just a lost link) read it from
/// `FramedConnection.closeReason`.
public enum ConnectionClosed: Sendable, Equatable, CustomStringConvertible {
    /// `close()` was called on this side.
    case closedLocally
    /// The peer closed or reset the connection.
    case peerClosed
    /// The byte stream stopped being valid frames; the stream cannot be resynchronised.
    case frameError(FrameError)
    /// The socket failed (errno).
    case socketError(Int32)

    public var frameError: FrameError? {
        if case .frameError(let e) = self { return e }
        return nil
    }

    /// The epoch of a frame that failed its CRC32C or its seal, which the replica reports as
    /// `corrupt-frame` (the epoch of the staged one when there is one: a failed frame's own
    /// header is only its claim).
    public var corruptEpoch: Epoch? {
        switch self {
        case .frameError(.checksumMismatch(_, let epoch, _)), .frameError(.unauthenticated(_, let epoch, _)):
            return Epoch(epoch)
        default:
            return nil
        }
    }

    public var description: String {
        switch self {
        case .closedLocally: "closed by this agent"
        case .peerClosed: "peer closed the connection"
        case .frameError(let e): e.description
        case .socketError(let e): Socket.describe(errno: e)
        }
    }

    func error(remote: String) -> GeminusError {
        switch self {
        case .closedLocally:
            GeminusError(.connectionFailed, "connection to \(remote) is closed")
        case .peerClosed:
            GeminusError(.connectionFailed, "connection to \(remote) lost: peer closed the connection")
        case .frameError(let e):
            if case .checksumMismatch = e {
                GeminusError(.connectionFailed, "connection to \(remote) dropped: \(e)")
            } else if case .unauthenticated = e {
                GeminusError(.connectionFailed, "connection to \(remote) dropped: \(e)")
            } else {
                GeminusError(.protocolMismatch, "connection to \(remote) dropped: \(e)")
            }
        case .socketError(let e):
            GeminusError(.connectionFailed, "connection to \(remote) failed: \(Socket.describe(errno: e))")
        }
    }
}
