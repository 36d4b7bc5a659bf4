#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GeminusCore
import Logging
import Synchronization

/// The secondary's listening socket. Connections authenticate on their own threads (at most
/// `maxConcurrentHandshakes` at once); `accept` hands out the next authenticated one after
/// the admission check; a failed handshake is logged and thrown, and the listener goes on.
public final class TCPListener: @unchecked Sendable {
    public let host: String
    /// The bound port (the kernel's choice when 0 was asked for).
    public let port: UInt16
    private let socket: Socket
    private let logger: Logger
    private let closed = Mutex(false)
    private let refusalLog = Mutex(LogThrottle())
    /// Connections still authenticating; more than this at once cuts off the oldest.
    public static let maxConcurrentHandshakes = 8
    private let handshakes = PreAuthHandshakes(limit: TCPListener.maxConcurrentHandshakes)

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

    /// Waits up to `timeout` for an authenticated connection (nil if none came), then asks
    /// `admit` (nil to admit, else the reason to refuse). Connections authenticate on their
    /// own threads within `options.handshakeTimeout` (`PreAuthHandshakes`), so a client that
    /// stalls does not hold the others up; a failed handshake is logged and thrown.
    /// `local` is the hello sent to the connections this call starts; one started by an
    /// earlier call may finish in this one with that call's hello.
    public func accept(key: PairKey, local: PeerHello, admit: (PeerHello) -> String?, timeout: Duration,
                       options: LinkOptions = LinkOptions()) throws(GeminusError) -> FramedConnection? {
        let deadline = timeout.deadlineFromNow
        while true {
            if let finished = handshakes.take() {
                return try complete(finished.result, remote: finished.remote, admit: admit, options: options)
            }
            switch try waitForConnection(deadlineNanos: deadline) {
            case .timedOut:
                return nil
            case .handshakeFinished:
                handshakes.drainWake()
            case .connection(let fd, let remote):
                let client = Socket(fd: fd)
                let handshakeDeadline = options.handshakeTimeout.deadlineFromNow
                let handshakeTimeout = options.handshakeTimeout
                let evicted = handshakes.start(client, remote: remote) {
                    do throws(GeminusError) {
                        return .success(try Handshake.serverAuthenticate(socket: client, key: key, local: local, remote: remote,
                                                                         deadlineNanos: handshakeDeadline, timeout: handshakeTimeout))
                    } catch {
                        client.release()
                        return .failure(error)
                    }
                }
                if let evicted {
                    logRefusal("\(handshakes.limit) unauthenticated connections at once: cut off the oldest, from \(evicted), to make room (someone is connecting and stalling)", remote: evicted)
                }
            }
        }
    }

    private func complete(_ result: PreAuthHandshakes.Result, remote: String, admit: (PeerHello) -> String?,
                          options: LinkOptions) throws(GeminusError) -> FramedConnection {
        do throws(GeminusError) {
            let authenticated = try result.get()
            do throws(GeminusError) {
                let outcome = try authenticated.finish(admit: admit, timeout: options.handshakeTimeout)
                logger.debug("accepted \(outcome.peer.role) of '\(outcome.peer.vmName)' from \(remote)")
                return FramedConnection(socket: authenticated.socket, handshake: outcome, local: authenticated.localHello,
                                        remoteAddress: remote, options: options, logger: logger)
            } catch {
                authenticated.release()
                throw error
            }
        } catch {
            logRefusal(error.message, remote: remote)
            throw error
        }
    }

    /// The same refusal again (a misconfigured peer retrying) is logged every 10 s with a
    /// count, not on every attempt. The peer's port changes each time, so it is not part of
    /// what counts as "the same".
    private func logRefusal(_ message: String, remote: String) {
        let repeats = refusalLog.withLock { $0.admit(message.replacingOccurrences(of: remote, with: ""), nowNanos: Monotonic.nanos()) }
        if let repeats {
            logger.warning("\(message)\(repeats > 0 ? " (and \(repeats) times more since this was last logged)" : "")")
        }
    }

    private enum Waited {
        case connection(Int32, String)
        case handshakeFinished
        case timedOut
    }

    private func waitForConnection(deadlineNanos: UInt64) throws(GeminusError) -> Waited {
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
                return .connection(fd, address.description)
            }
            let e = errno
            switch e {
            case EAGAIN, EWOULDBLOCK:
                switch pollListenerAndWake(deadlineNanos: deadlineNanos) {
                case .timedOut: return .timedOut
                case .failed(let pe): throw GeminusError(.io, "waiting for connections on \(host):\(port) failed: \(Socket.describe(errno: pe))")
                case .woken: return .handshakeFinished
                case .readable: continue
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

    private enum Polled { case readable, woken, timedOut, failed(Int32) }

    /// Polls the listening socket and the handshakes' wake pipe, in slices of at most 100 ms
    /// so that `close()` is noticed.
    private func pollListenerAndWake(deadlineNanos: UInt64) -> Polled {
        var fds = [pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: handshakes.wakeFDs[0], events: Int16(POLLIN), revents: 0)]
        while true {
            let now = Monotonic.nanos()
            if now >= deadlineNanos { return .timedOut }
            if closed.withLock({ $0 }) { return .readable }
            let millis = Int32(min((deadlineNanos - now + 999_999) / 1_000_000, 100))
            let n = poll(&fds, 2, millis)
            if n < 0 {
                if errno == EINTR { continue }
                return .failed(errno)
            }
            if fds[1].revents != 0 { return .woken }
            if fds[0].revents != 0 { return .readable }
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
        handshakes.close()
        socket.shutdown()
        socket.release()
    }

    deinit { close() }
}
