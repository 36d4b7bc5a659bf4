import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Connecting to a unix socket a QEMU we started is about to open (its QMP monitor, its serial
/// console): retried every 5 ms until `timeout`, as QEMU creates its sockets only once it runs.
enum UnixSocket {
    /// A connected, close-on-exec stream socket. `what` names the socket in the error ("QMP
    /// socket"); `fix` is the error's fix.
    static func connect(path: String, timeout: Double, what: String, fix: String? = nil) throws(GeminusError) -> Int32 {
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        while true {
            let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard s >= 0 else {
                throw GeminusError(.resourceExhausted, "cannot create a unix socket: \(String(cString: strerror(errno)))")
            }
            if attempt(s, path: path) { return s }
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

    /// A close-on-exec stream socket listening at `path` (a stale file is replaced), mode 0600:
    /// where a QEMU we start connects to us (a NIC backend, a disk mirror). `what` names it.
    static func listen(path: String, what: String) throws(GeminusError) -> Int32 {
        guard var addr = unixSocketAddress(path) else {
            throw GeminusError(.invalidArgument, "\(what) path too long (at most 107 bytes): \(path)", fix: "use a shorter TMPDIR for the agent")
        }
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw GeminusError(.resourceExhausted, "cannot create a unix socket: \(String(cString: strerror(errno)))") }
        unlink(path)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, Glibc.listen(s, 1) == 0 else {
            let e = errno
            close(s)
            throw GeminusError(.io, "cannot listen on \(what) \(path): \(String(cString: strerror(e)))")
        }
        chmod(path, 0o600)
        return s
    }

    /// Waits for the next connection on `listener`, looking every 100 ms whether to go on;
    /// nil once `keepWaiting` says no. The connection is close-on-exec.
    static func accept(_ listener: Int32, keepWaiting: () -> Bool) -> Int32? {
        while keepWaiting() {
            var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            let fd = Glibc.accept(listener, nil, nil)
            guard fd >= 0 else { continue }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            return fd
        }
        return nil
    }
}
