import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Who may be at the other end of one of the agent's unix sockets (QMP, serial, NIC, disk
/// export). The kernel's SO_PEERCRED says who it is; nothing is read from or written to a peer
/// before it passes (review H3/M9: a process that got to a socket path first must not be
/// taken for QEMU).
public enum SocketPeer: Sendable, Equatable, CustomStringConvertible {
    /// The process with this pid (the QEMU the agent started, or libvirt's QEMU of a domain).
    case process(Int32)
    /// Any process of this user (a QEMU whose pid is not known yet or not at all: the user
    /// libvirt runs QEMU as).
    case user(uid_t)

    /// Any process of the agent's own user.
    public static var sameUser: SocketPeer { .user(geteuid()) }

    public var description: String {
        switch self {
        case .process(let pid): "process \(pid)"
        case .user(let uid): "a process of uid \(uid)"
        }
    }

    /// Whether `credentials` (SO_PEERCRED) name this peer.
    public func admits(_ credentials: PeerCredentials) -> Bool {
        switch self {
        case .process(let pid): credentials.pid == pid
        case .user(let uid): credentials.uid == uid
        }
    }
}

/// Who is at the other end of a unix socket, as the kernel says (SO_PEERCRED).
public struct PeerCredentials: Sendable, Equatable {
    public var pid: Int32
    public var uid: uid_t
    public var gid: gid_t
}

/// Connecting to a unix socket a QEMU we started is about to open (its QMP monitor, its serial
/// console): retried every 5 ms until `timeout`, as QEMU creates its sockets only once it runs.
enum UnixSocket {
    /// A connected, close-on-exec stream socket whose peer is `peer`. `what` names the socket
    /// in the error ("QMP socket"); `fix` is the error's fix.
    static func connect(path: String, timeout: Double, what: String, fix: String? = nil,
                        peer: SocketPeer = .sameUser) throws(GeminusError) -> Int32 {
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        while true {
            let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard s >= 0 else {
                throw GeminusError(.resourceExhausted, "cannot create a unix socket: \(String(cString: strerror(errno)))")
            }
            if attempt(s, path: path) {
                do throws(GeminusError) {
                    try check(s, is: peer, what: what, path: path)
                } catch {
                    Glibc.close(s)
                    throw error
                }
                return s
            }
            let lastErrno = errno
            Glibc.close(s)
            if Monotonic.nanos() >= deadline {
                throw GeminusError(.connectionFailed, "cannot connect to \(what) \(path) within \(timeout) s: \(String(cString: strerror(lastErrno)))", fix: fix)
            }
            Monotonic.sleep(nanos: 5_000_000)
        }
    }

    private static func attempt(_ s: Int32, path: String) -> Bool {
        guard var addr = unixSocketAddress(path) else { errno = ENAMETOOLONG; return false }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
    }

    /// The peer's credentials as the kernel recorded them at connect (or listen) time.
    static func credentials(of fd: Int32) -> PeerCredentials? {
        // struct ucred (pid, uid, gid: three 32-bit fields); Glibc hides it without _GNU_SOURCE.
        var raw: (Int32, UInt32, UInt32) = (0, 0, 0)
        var length = socklen_t(MemoryLayout<(Int32, UInt32, UInt32)>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &raw, &length) == 0, length == 12 else { return nil }
        return PeerCredentials(pid: raw.0, uid: raw.1, gid: raw.2)
    }

    /// Throws unless the peer of `fd` is `peer`.
    static func check(_ fd: Int32, is peer: SocketPeer, what: String, path: String) throws(GeminusError) {
        guard let c = credentials(of: fd) else {
            throw GeminusError(.connectionFailed, "cannot tell who is behind \(what) \(path): \(String(cString: strerror(errno)))")
        }
        guard peer.admits(c) else {
            throw GeminusError(.connectionFailed,
                               "\(what) \(path) is served by process \(c.pid) (uid \(c.uid)), not by \(peer); refusing to talk to it",
                               fix: "another process holds the path: stop it, and keep the agent's run directory private to the agent")
        }
    }

    /// A close-on-exec stream socket listening at `path` (a stale file is replaced), mode 0600
    /// from the moment it exists: where a QEMU we start connects to us (a NIC backend, a disk
    /// mirror). `what` names it. Connections are accepted from `SocketPeer.sameUser` until
    /// `expect` names the peer.
    static func listen(path: String, what: String) throws(GeminusError) -> Int32 {
        guard var addr = unixSocketAddress(path) else {
            throw GeminusError(.invalidArgument, "\(what) path too long (at most 107 bytes): \(path)", fix: "use a shorter TMPDIR for the agent")
        }
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw GeminusError(.resourceExhausted, "cannot create a unix socket: \(String(cString: strerror(errno)))") }
        // bind creates the file with the socket's own mode less the umask: set on the socket
        // first, the file is never open to others, and no process-wide umask is touched.
        guard fchmod(s, 0o600) == 0 else {
            let e = errno
            close(s)
            throw GeminusError(.io, "cannot restrict \(what) to this user: \(String(cString: strerror(e)))")
        }
        unlink(path)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, Glibc.listen(s, 1) == 0 else {
            let e = errno
            close(s)
            throw GeminusError(.io, "cannot listen on \(what) \(path): \(String(cString: strerror(e)))")
        }
        expectations.withLock { $0[s] = Expectation(path: path, what: what, peer: .sameUser) }
        return s
    }

    private struct Expectation {
        var path: String
        var what: String
        var peer: SocketPeer
    }

    /// Who may connect to each listening socket, by descriptor (set by `listen`, `expect`).
    private static let expectations = LockedValue<[Int32: Expectation]>([:])
    private static let refusals = LockedValue<(count: Int, last: String?)>((0, nil))

    /// From now on only `peer` is accepted on the socket listening at `path` (the QEMU that
    /// was just started to connect to it).
    static func expect(_ peer: SocketPeer, onListenerAt path: String) {
        expectations.withLock { table in
            for (fd, e) in table where e.path == path { table[fd]?.peer = peer }
        }
    }

    /// Connections refused because the peer was not the expected one, and the last reason.
    static var refusedPeers: (count: Int, last: String?) { refusals.withLock { $0 } }

    /// Forgets `listener` (about to be closed).
    static func forget(_ listener: Int32) {
        _ = expectations.withLock { $0.removeValue(forKey: listener) }
    }

    /// Waits for the next connection on `listener` from its expected peer, looking every 100 ms
    /// whether to go on; nil once `keepWaiting` says no. Another peer is disconnected unread
    /// (and counted). The connection is close-on-exec.
    static func accept(_ listener: Int32, keepWaiting: () -> Bool) -> Int32? {
        while keepWaiting() {
            var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            let fd = Glibc.accept(listener, nil, nil)
            guard fd >= 0 else { continue }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            let expected = expectations.withLock { $0[listener] }
                ?? Expectation(path: "(socket \(listener))", what: "a socket", peer: .sameUser)
            do throws(GeminusError) {
                try check(fd, is: expected.peer, what: expected.what, path: expected.path)
            } catch {
                close(fd)
                refusals.withLock { $0 = ($0.count + 1, error.message) }
                continue
            }
            return fd
        }
        return nil
    }
}

/// A value behind a lock, for the few process-wide tables here.
final class LockedValue<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}
