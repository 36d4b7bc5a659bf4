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
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { errno = ENAMETOOLONG; return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let len = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s, $0, len) == 0 }
        }
    }
}
