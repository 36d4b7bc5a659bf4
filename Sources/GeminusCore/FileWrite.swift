#if canImport(Glibc)
import Glibc
#endif

/// Writes all of `bytes` to `fd`, going on after short writes and EINTR. Returns 0, or the
/// errno of the write that failed.
public func writeFully(_ fd: Int32, _ bytes: [UInt8]) -> Int32 {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
        if n < 0 {
            if errno == EINTR { continue }
            return errno
        }
        offset += n
    }
    return 0
}
