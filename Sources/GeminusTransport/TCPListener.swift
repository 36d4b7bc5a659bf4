#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GeminusCore
import Logging
import Synchronization

/// The secondary's listening socket. Each `accept` takes one connection and runs the
/// handshake on the calling thread; a failed handshake is logged and thrown, and the
/// listener goes on working.
public final class TCPListener: @unchecked Sendable {
    public let host: String
    /// The bound port (the kernel's choice when 0 was asked for).
    public let port: UInt16
    private let socket: Socket
    private let logger: Logger
    private let closed = Mutex(false)
    private let refusalLog = Mutex(LogThrottle())

    public init(host: String, port: UInt16, logger: Logger = Logger(label: "geminus.transport")) throws(GeminusError) {
        self.host = host
        self.logger = logger
        let address = try SocketAddress.resolve(host: host, port: port, passive: true)[0]
        let fd = Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else {
            throw GeminusError(.resourceExhausted, "cannot create a socket: \(Socket.describe(errno: errno))")
        }
        // A restarted secondary must get its port back while old connections sit in TIME_WAIT.
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = address.withSockaddr { bind(fd, $0, $1) }
        if bound != 0 {
            let e = errno
            Glibc.close(fd)
            throw Self.bindError(e, host: host, port: port)
        }
        guard listen(fd, 16) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw GeminusError(.io, "cannot listen on \(host):\(port): \(Socket.describe(errno: e))")
        }
        socket = Socket(fd: fd)
        self.port = SocketAddress.of(fd: fd, peer: false)?.port ?? port
    }

    private static func bindError(_ e: Int32, host: String, port: UInt16) -> GeminusError {
        switch e {
        case EADDRINUSE:
            GeminusError(.addressInUse, "port \(port) on \(host) is in use by another process",
                         fix: "choose another with --listen or stop the other process")
        case EACCES:
            GeminusError(.addressInUse, "not allowed to listen on port \(port) on \(host) (ports below 1024 need privileges)",
                         fix: "choose a port of 1024 or above with --listen")
        case EADDRNOTAVAIL:
            GeminusError(.invalidArgument, "\(host) is not an address of this host",
                         fix: "listen on one of this host's addresses, or 0.0.0.0 for all")
        default:
            GeminusError(.io, "cannot listen on \(host):\(port): \(Socket.describe(errno: e))")
        }
    }

    /// Waits up to `timeout` for a connection (nil if none came), then authenticates it within
    /// `options.handshakeTimeout` and asks `admit` (nil to admit, else the reason to refuse).
    public func accept(key: PairKey, local: PeerHello, admit: (PeerHello) -> String?, timeout: Duration,
                       options: LinkOptions = LinkOptions()) throws(GeminusError) -> FramedConnection? {
        guard let (fd, remote) = try waitForConnection(deadlineNanos: timeout.deadlineFromNow) else { return nil }
        let client = Socket(fd: fd)
        do throws(GeminusError) {
            let outcome = try Handshake.server(socket: client, key: key, local: local, admit: admit, remote: remote,
                                               deadlineNanos: options.handshakeTimeout.deadlineFromNow,
                                               timeout: options.handshakeTimeout)
            logger.debug("accepted \(outcome.peer.role) of '\(outcome.peer.vmName)' from \(remote)")
            return FramedConnection(socket: client, handshake: outcome, local: local,
                                    remoteAddress: remote, options: options, logger: logger)
        } catch {
            client.release()
            // The same refusal again (a misconfigured peer retrying) is logged every 10 s with a
            // count, not on every attempt. The peer's port changes each time, so it is not part
            // of what counts as "the same".
            let repeats = refusalLog.withLock { $0.admit(error.message.replacingOccurrences(of: remote, with: ""), nowNanos: Monotonic.nanos()) }
            if let repeats {
                logger.warning("\(error.message)\(repeats > 0 ? " (and \(repeats) times more since this was last logged)" : "")")
            }
            throw error
        }
    }

    private func waitForConnection(deadlineNanos: UInt64) throws(GeminusError) -> (Int32, String)? {
        // Holding a reference keeps the descriptor number ours even if close() runs meanwhile.
        guard socket.retainIfOpen() else { throw closedError }
        defer { socket.release() }
        while true {
            if closed.withLock({ $0 }) { throw closedError }
            var address = SocketAddress()
            address.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let fd = withUnsafeMutablePointer(to: &address.storage) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.accept(socket.fd, $0, &address.length)
                }
            }
            if fd >= 0 {
                // accept4 (atomic close-on-exec) is not visible from Swift's Glibc module; an
                // agent that forks in this instant leaks the descriptor into the child, and
                // close() shuts the connection down regardless.
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                return (fd, address.description)
            }
            let e = errno
            switch e {
            case EAGAIN, EWOULDBLOCK:
                switch socket.waitUntil(Int16(POLLIN), deadlineNanos: deadlineNanos) {
                case .timedOut: return nil
                case .failed(let pe): throw GeminusError(.io, "waiting for connections on \(host):\(port) failed: \(Socket.describe(errno: pe))")
                default: continue
                }
            case EINTR, ECONNABORTED, EPROTO:
                continue
            case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                throw GeminusError(.resourceExhausted, "cannot accept a connection on \(host):\(port): \(Socket.describe(errno: e))",
                                   fix: "raise the open-file limit (ulimit -n) or find what holds descriptors")
            case EINVAL where closed.withLock({ $0 }):
                throw closedError
            default:
                throw GeminusError(.io, "cannot accept a connection on \(host):\(port): \(Socket.describe(errno: e))")
            }
        }
    }

    private var closedError: GeminusError {
        GeminusError(.connectionFailed, "the listener on \(host):\(port) is closed")
    }

    /// Stops listening at once (the port is free when this returns, unless an `accept` is
    /// inside its brief poll, which it leaves within one poll cycle). Idempotent.
    public func close() {
        let first = closed.withLock { c -> Bool in
            defer { c = true }
            return !c
        }
        guard first else { return }
        socket.shutdown()
        socket.release()
    }

    deinit { close() }
}
