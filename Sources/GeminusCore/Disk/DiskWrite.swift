#if canImport(Glibc)
import Glibc
#endif

/// One write the guest made to its disk in an epoch (or, in a full checkpoint, one stretch of
/// the whole disk): carried in the checkpoint stream with the epoch's memory and applied to the
/// replica disk only when the epoch commits (promise S2 for disks).
public struct DiskWrite: Equatable, Sendable {
    public var offset: UInt64
    public var data: [UInt8]

    public init(offset: UInt64, data: [UInt8]) {
        self.offset = offset
        self.data = data
    }

    /// Record header on the wire: offset u64, length u32, reserved u32.
    public static let headerSize = 16
}

/// The secondary's copy of the guest's disk: the standby QEMU's disk file, written only at
/// commits.
public protocol ReplicaDisk: AnyObject {
    var sizeBytes: UInt64 { get }
    /// Writes `data` at `offset` (the whole buffer, or an error).
    func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError)
    /// Makes the whole disk read as zeros (before a full checkpoint, which sends only the
    /// non-zero stretches).
    func zeroAll() throws(GeminusError)
    /// Makes what was written durable.
    func sync() throws(GeminusError)
}

/// A replica disk in a raw file, created (or truncated) to its size.
public final class FileReplicaDisk: ReplicaDisk {
    public let path: String
    public let sizeBytes: UInt64
    private let fd: Int32

    public init(path: String, sizeBytes: UInt64) throws(GeminusError) {
        self.path = path
        self.sizeBytes = sizeBytes
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw GeminusError(.io, "cannot open the replica disk \(path): \(String(cString: strerror(errno)))") }
        guard ftruncate(fd, off_t(sizeBytes)) == 0 else {
            let e = errno
            close(fd)
            throw GeminusError(.io, "cannot size the replica disk \(path) to \(sizeBytes) bytes: \(String(cString: strerror(e)))")
        }
    }

    deinit { close(fd) }

    public func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
        guard offset + UInt64(data.count) <= sizeBytes else {
            throw GeminusError(.invalidArgument, "a disk write at \(offset)+\(data.count) is beyond the \(sizeBytes)-byte disk")
        }
        var done = 0
        while done < data.count {
            let n = data.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, data.count - done, off_t(offset) + off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw GeminusError(.io, "writing the replica disk \(path) failed: \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    public func zeroAll() throws(GeminusError) {
        guard ftruncate(fd, 0) == 0, ftruncate(fd, off_t(sizeBytes)) == 0 else {
            throw GeminusError(.io, "cannot clear the replica disk \(path): \(String(cString: strerror(errno)))")
        }
    }

    public func sync() throws(GeminusError) {
        guard fdatasync(fd) == 0 else { throw GeminusError(.io, "cannot sync the replica disk \(path): \(String(cString: strerror(errno)))") }
    }
}
