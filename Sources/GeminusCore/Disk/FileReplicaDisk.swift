#if canImport(Glibc)
import Glibc
#endif
import CGeminusSupport

/// A replica disk in a raw image: a regular file (created sparse when missing or empty) or a
/// block device (used as it is), written in place and kept crash-safe by the journal
/// (`JournaledReplicaDisk` says how).
public final class FileReplicaDisk: JournaledReplicaDisk {
    public let path: String
    public let isBlockDevice: Bool

    /// Opens (or creates) the image at `path` for a disk of `sizeBytes`, then recovers whatever
    /// a crash left in its journal. `journalPath` defaults to `<path>.geminus-journal` for a file;
    /// a block device's journal cannot live beside it in /dev (a RAM filesystem), so its default
    /// is under /var/lib/geminus/journals.
    ///
    /// Refused: a block device of another size, an existing non-empty file of another size (an
    /// operator's image is never truncated), anything but a file or a block device.
    public init(path: String, sizeBytes: UInt64, journalPath: String? = nil) throws(GeminusError) {
        let backend = try FileBlockBackend(path: path, sizeBytes: sizeBytes)
        self.path = path
        isBlockDevice = backend.isBlockDevice
        let journalPath = journalPath ?? (backend.isBlockDevice ? Self.blockDeviceJournalPath(path) : path + ".geminus-journal")
        if journalPath.hasPrefix(Self.blockDeviceJournalDirectory + "/") { try Self.makeJournalDirectory() }
        try super.init(backend: backend, journalPath: journalPath)
    }

    public static let blockDeviceJournalDirectory = "/var/lib/geminus/journals"

    static func blockDeviceJournalPath(_ device: String) -> String {
        let name = device.split(separator: "/").joined(separator: "_")
        return blockDeviceJournalDirectory + "/" + name + ".geminus-journal"
    }

    private static func makeJournalDirectory() throws(GeminusError) {
        var dir = ""
        for part in blockDeviceJournalDirectory.split(separator: "/") {
            dir += "/" + part
            if mkdir(dir, 0o700) != 0 && errno != EEXIST {
                throw GeminusError(.io, "cannot create \(dir) for the replica disk's journal: \(String(cString: strerror(errno)))",
                                   fix: "create it, or give the replica disk a journal path on a local filesystem")
            }
        }
    }
}

/// A raw file or block device written in place: the guest's offsets are the file's.
public final class FileBlockBackend: BlockBackend {
    public let path: String
    public let sizeBytes: UInt64
    public let isBlockDevice: Bool
    public var name: String { "the replica disk \(path)" }
    private let fd: Int32

    /// See `FileReplicaDisk.init` for what is refused.
    public init(path: String, sizeBytes: UInt64) throws(GeminusError) {
        let opened = try Self.openImage(path: path, sizeBytes: sizeBytes)
        fd = opened.fd
        isBlockDevice = opened.isBlockDevice
        self.path = path
        self.sizeBytes = sizeBytes
    }

    deinit { close(fd) }

    private static func openImage(path: String, sizeBytes: UInt64) throws(GeminusError) -> (fd: Int32, isBlockDevice: Bool) {
        let fd = try openOrCreate(path: path)
        do throws(GeminusError) {
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw GeminusError(.io, "cannot stat the replica disk \(path): \(String(cString: strerror(errno)))") }
            switch st.st_mode & S_IFMT {
            case S_IFBLK:
                var size: UInt64 = 0
                let r = geminus_blkdev_size(fd, &size)
                guard r == 0 else { throw GeminusError(.io, "cannot read the size of block device \(path): \(String(cString: strerror(-r)))") }
                guard size == sizeBytes else {
                    throw GeminusError(.invalidArgument, "the replica block device \(path) has \(size) bytes, the primary's disk \(sizeBytes)",
                                       fix: "give the standby a device of exactly \(sizeBytes) bytes (e.g. lvcreate -L \(sizeBytes)b), or a file path")
                }
                return (fd, true)
            case S_IFREG:
                let size = UInt64(st.st_size)
                if size == sizeBytes { return (fd, false) }
                guard size == 0 else {
                    throw GeminusError(.invalidArgument, "the replica image \(path) already has \(size) bytes, the primary's disk \(sizeBytes); it is not truncated",
                                       fix: "point the standby at a new path, or, if that image may be overwritten, delete it or resize it (truncate -s \(sizeBytes) \(path))")
                }
                // Missing or empty: sized sparse; a full epoch fills it.
                guard ftruncate(fd, off_t(sizeBytes)) == 0 else {
                    throw GeminusError(.io, "cannot size the replica disk \(path) to \(sizeBytes) bytes: \(String(cString: strerror(errno)))",
                                       fix: "check the filesystem's free space and file size limit")
                }
                return (fd, false)
            default:
                throw GeminusError(.invalidArgument, "the replica disk \(path) is neither a regular file nor a block device",
                                   fix: "give the standby an image file path or a block device")
            }
        } catch {
            close(fd)
            throw error
        }
    }

    /// Never created under /dev (a mistyped device name would become a file in RAM), and there
    /// links are followed: /dev/VG/LV is root's link to /dev/dm-N. Elsewhere, /dev/shm included
    /// (a filesystem for files: the agents' run directories are there), an existing image is
    /// opened without following a link, and a missing one is created exclusively (H3).
    private static func openOrCreate(path: String) throws(GeminusError) -> Int32 {
        if path.hasPrefix("/dev/") && !path.hasPrefix("/dev/shm/") {
            let fd = open(path, O_RDWR | O_CLOEXEC)
            guard fd >= 0 else {
                throw GeminusError(.io, "cannot open the replica disk \(path): \(String(cString: strerror(errno)))",
                                   fix: "check that the device exists and this agent may write it")
            }
            return fd
        }
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        if fd >= 0 { return fd }
        let e = errno
        switch e {
        case ENOENT:
            return try PrivateFile.createNew(path, what: "the replica disk")
        case ELOOP:
            throw GeminusError(.io, "the replica disk \(path) is a symbolic link; refusing to follow it",
                               fix: "give the standby the image's real path")
        default:
            throw GeminusError(.io, "cannot open the replica disk \(path): \(String(cString: strerror(e)))",
                               fix: "check that its directory exists and this agent may write there")
        }
    }

    public func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
        try pwriteAll(fd, data, at: offset, what: "the replica disk \(path)")
    }

    /// A regular file: a punched hole (its blocks given back); a block device: BLKZEROOUT (zeros
    /// guaranteed, the device's write-zeroes command when it has one). Written zeros where
    /// neither works.
    public func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
        guard length > 0 else { return }
        if isBlockDevice {
            // BLKZEROOUT takes whole logical blocks; 4 KiB is a multiple of any of them.
            let align: UInt64 = 4096
            let start = (offset + align - 1) / align * align
            let end = (offset + length) / align * align
            if start < end {
                let r = geminus_blkdev_zeroout(fd, start, end - start)
                if r == 0 {
                    try writeZeros(offset, start - offset)
                    try writeZeros(end, offset + length - end)
                    return
                }
                guard r == -EOPNOTSUPP || r == -ENOTTY || r == -EINVAL else {
                    throw GeminusError(.io, "zeroing \(start)+\(end - start) of the replica disk \(path) failed: \(String(cString: strerror(-r)))",
                                       fix: "check the device (errors in the kernel log)")
                }
            }
        } else {
            let r = geminus_punch_hole(fd, offset, length)
            if r == 0 { return }
            guard r == -EOPNOTSUPP || r == -ENOSYS else {
                throw GeminusError(.io, "punching a hole at \(offset)+\(length) in the replica disk \(path) failed: \(String(cString: strerror(-r)))",
                                   fix: "check the filesystem holding it")
            }
        }
        try writeZeros(offset, length)
    }

    /// A regular file is truncated to nothing and back (sparse, instant). A block device is
    /// zeroed with BLKZEROOUT over its whole length: BLKDISCARD would be faster but does not
    /// promise zeros afterwards (many devices return old data or garbage).
    public func zeroAll() throws(GeminusError) {
        if isBlockDevice { return try zero(offset: 0, length: sizeBytes) }
        guard ftruncate(fd, 0) == 0, ftruncate(fd, off_t(sizeBytes)) == 0 else {
            throw GeminusError(.io, "cannot clear the replica disk \(path): \(String(cString: strerror(errno)))")
        }
    }

    public func sync() throws(GeminusError) {
        guard fdatasync(fd) == 0 else {
            throw GeminusError(.io, "cannot sync the replica disk \(path): \(String(cString: strerror(errno)))", fix: "check the device (errors in the kernel log)")
        }
    }

    private func writeZeros(_ offset: UInt64, _ length: UInt64) throws(GeminusError) {
        let chunk = 1 << 20
        let zeros = [UInt8](repeating: 0, count: Int(min(length, UInt64(chunk))))
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(length - done, UInt64(chunk)))
            try pwriteAll(fd, n == zeros.count ? zeros : Array(zeros[0..<n]), at: offset + done, what: "the replica disk \(path)")
            done += UInt64(n)
        }
    }
}
