#if canImport(Glibc)
import Glibc
#endif
import GeminusCore
import Logging

/// The primary's side: connect, authenticate, hand back a running connection.
public enum TCPDialer {
    /// `timeout` bounds connecting and the handshake together.
    public static func connect(host: String, port: UInt16, key: PairKey, local: PeerHello, timeout: Duration,
                               options: LinkOptions = LinkOptions(),
                               logger: Logger = Logger(label: "geminus.transport")) throws(GeminusError) -> FramedConnection {
        let deadline = timeout.deadlineFromNow
        let target = "\(host):\(port)"
        let addresses = try SocketAddress.resolve(host: host, port: port, passive: false)
        var errors: [Int32] = []
        for address in addresses {
            let (fd, e) = connectOne(address, deadlineNanos: deadline)
            if fd >= 0 {
                let socket = Socket(fd: fd)
                let remote = SocketAddress.of(fd: fd, peer: true)?.description ?? target
                do throws(GeminusError) {
                    let outcome = try Handshake.client(socket: socket, key: key, local: local, remote: remote,
                                                       deadlineNanos: deadline, timeout: timeout)
                    logger.debug("connected to \(outcome.peer.role) of '\(outcome.peer.vmName)' at \(remote)")
                    return FramedConnection(socket: socket, handshake: outcome, local: local,
                                            remoteAddress: remote, options: options, logger: logger)
                } catch {
                    socket.release()
                    throw error
                }
            }
            errors.append(e)
            if e == ETIMEDOUT { break }
        }
        throw connectError(errors, target: target, timeout: timeout)
    }

    private static func connectError(_ errors: [Int32], target: String, timeout: Duration) -> GeminusError {
        if errors.contains(ETIMEDOUT) {
            return GeminusError(.timeout, "connecting to \(target) timed out after \(timeout.millisDescription)",
                                fix: "check that the secondary's host is up and no firewall drops the port")
        }
        if errors.allSatisfy({ $0 == ECONNREFUSED }) {
            return GeminusError(.connectionFailed, "no Geminus agent listening on \(target) (connection refused)",
                                fix: "start the secondary first, or check the host and port")
        }
        let e = errors.first { $0 != ECONNREFUSED } ?? ECONNREFUSED
        return GeminusError(.connectionFailed, "cannot connect to \(target): \(Socket.describe(errno: e))")
    }

    /// A connected, blocking descriptor, or the errno (ETIMEDOUT when the deadline passed).
    private static func connectOne(_ address: SocketAddress, deadlineNanos: UInt64) -> (fd: Int32, errno: Int32) {
        let fd = socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return (-1, errno) }
        // Non-blocking only while connecting, so that the deadline holds; the connection's
        // threads then use blocking calls.
        if address.withSockaddr({ Glibc.connect(fd, $0, $1) }) != 0 {
            var e = errno
            if e == EINPROGRESS {
                switch pollDescriptor(fd, Int16(POLLOUT), deadlineNanos: deadlineNanos) {
                case .done:
                    var length = socklen_t(MemoryLayout<Int32>.size)
                    e = 0
                    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &length) != 0 { e = errno }
                case .timedOut: e = ETIMEDOUT
                case .failed(let pe): e = pe
                case .endOfStream: e = ECONNRESET
                }
            }
            if e != 0 {
                Glibc.close(fd)
                return (-1, e)
            }
        }
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK)
        return (fd, 0)
    }
}
