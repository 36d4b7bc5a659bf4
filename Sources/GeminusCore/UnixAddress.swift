#if canImport(Glibc)
import Glibc
#endif

/// The `sockaddr_un` for a unix socket path, or nil when the path does not fit (107 bytes):
/// the status socket, QEMU's monitor and console, the NIC backend and the disk export.
public func unixSocketAddress(_ path: String) -> sockaddr_un? {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return nil }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    return addr
}
