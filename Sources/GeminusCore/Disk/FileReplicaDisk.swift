#if canImport(Glibc)
import Glibc
#endif
import CGeminusSupport

/// A replica disk in a raw image: a regular file (created sparse when missing or empty) or a
/// block device (used as it is), kept crash-safe by a `DiskJournal`.
///
/// Replica disk durability (docs/PROTOCOL.md says the same):
/// - An epoch that is not live is applied through the journal: its writes go to the journal,
///   which is fdatasynced (and renamed into place, the directory fsynced); only then are they
///   applied to the image; the image is fdatasynced; then the journal is truncated to nothing
///   and that fdatasynced. A crash before the journal is durable leaves the previous epoch's
///   image (nothing was applied yet); a crash after it leaves a journal that replays the epoch
///   whole when the disk is opened again or `recover()` runs. So the image is always one
///   committed epoch, never a mix of two.
/// - A full epoch that is not live (a resynchronisation while paused) goes through the journal
///   too, flagged to zero the disk first: replaying it is still idempotent, and its data is
///   bounded by `Replica.maxDiskBytesPerEpoch`, so the journal holds at most one epoch of it.
/// - Live epochs (rounds of the live first copy) are applied directly, without the journal:
///   until a whole paused checkpoint commits, the replica cannot be resumed anyway, and
///   journaling a whole disk's first copy would write it twice. Before the first direct write,
///   an "unsafe" marker is made durable in the journal's place, so a crash mid-copy is never
///   taken for a checkpoint (`recover()` answers `.notResumable`). The next journaled epoch
///   first fdatasyncs the image (the direct writes), then its journal replaces the marker.
public final class FileReplicaDisk: ReplicaDisk {
    public let path: String
    public let sizeBytes: UInt64
    public let isBlockDevice: Bool
    public let journal: DiskJournal
    /// The image was written without the journal (live epochs): the journal holds the unsafe
    /// marker, and the image is no checkpoint until a journaled epoch commits.
    public private(set) var isMarkedUnsafe = false
    /// What the last `recover()` (the one in `init`, or the standby's before resuming) found:
    /// for the log, and for tests.
    public private(set) var lastRecovery: DiskRecovery = .clean
    /// Direct writes not yet fdatasynced (they must be before the marker goes).
    private var imageDirty = false
    private let fd: Int32

    /// Test hook: after this many more record writes (`write`/`zero`), the next fails as if the
    /// process died there (the journal and the half-applied image stay as a crash leaves them).
    var crashAfterRecordWrites: Int?

    /// Opens (or creates) the image at `path` for a disk of `sizeBytes`, then recovers whatever
    /// a crash left in its journal. `journalPath` defaults to `<path>.geminus-journal` for a file;
    /// a block device's journal cannot live beside it in /dev (a RAM filesystem), so its default
    /// is under /var/lib/geminus/journals.
    ///
    /// Refused: a block device of another size, an existing non-empty file of another size (an
    /// operator's image is never truncated), anything but a file or a block device.
    public init(path: String, sizeBytes: UInt64, journalPath: String? = nil) throws(GeminusError) {
        let opened = try Self.openImage(path: path, sizeBytes: sizeBytes)
        fd = opened.fd
        isBlockDevice = opened.isBlockDevice
        self.path = path
        self.sizeBytes = sizeBytes
        let journalPath = journalPath ?? (opened.isBlockDevice ? Self.blockDeviceJournalPath(path) : path + ".geminus-journal")
        journal = DiskJournal(path: journalPath)
        // Fully initialised: from here a throw releases self and deinit closes the descriptor.
        if journalPath.hasPrefix(Self.blockDeviceJournalDirectory + "/") { try Self.makeJournalDirectory() }
        try recover()
    }

    deinit { close(fd) }

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

    private static func openImage(path: String, sizeBytes: UInt64) throws(GeminusError) -> (fd: Int32, isBlockDevice: Bool) {
        // Never created under /dev: a mistyped device name would become a file in RAM.
        let fd = open(path, O_RDWR | O_CLOEXEC | (path.hasPrefix("/dev/") ? 0 : O_CREAT), 0o600)
        guard fd >= 0 else {
            throw GeminusError(.io, "cannot open the replica disk \(path): \(String(cString: strerror(errno)))",
                               fix: "check that its directory exists and this agent may write there")
        }
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

    // MARK: - Commit and recovery

    public func commit(_ epoch: DiskCommit) throws(GeminusError) {
        if epoch.isLive {
            // Direct: never resumable (see the type's comment), but said so durably first.
            if !isMarkedUnsafe {
                try journal.markUnsafe(diskSize: sizeBytes)
                isMarkedUnsafe = true
            }
            imageDirty = true
            try applyInOrder(epoch)
            return
        }
        if epoch.writes.isEmpty && !epoch.replacesDisk {
            // Nothing to write; but a paused epoch after a live copy makes the image a
            // checkpoint: once the copy's writes are durable, the marker goes.
            guard isMarkedUnsafe else { return }
            try syncImageThenClearJournal()
            return
        }
        // The direct writes before the journal replaces the marker: a replay must start from them.
        if imageDirty {
            try sync()
            imageDirty = false
        }
        try journal.write(epoch: epoch.epoch, diskSize: sizeBytes, replacesDisk: epoch.replacesDisk, writes: epoch.writes)
        isMarkedUnsafe = false
        // A failure from here leaves the journal pending: `recover()` (or the next open)
        // replays it; the Replica meanwhile treats the replica as needing a full epoch.
        try applyInOrder(epoch)
        try syncImageThenClearJournal()
    }

    @discardableResult
    public func recover() throws(GeminusError) -> DiskRecovery {
        let found = try recoverJournal()
        lastRecovery = found
        return found
    }

    private func recoverJournal() throws(GeminusError) -> DiskRecovery {
        switch try journal.inspect(diskSize: sizeBytes) {
        case .clean:
            isMarkedUnsafe = false
            return .clean
        case .unsafe:
            isMarkedUnsafe = true
            return .notResumable
        case .pending(let header):
            try journal.replay(header, onto: self)
            try syncImageThenClearJournal()
            return .replayed(header.epoch)
        case .invalid(let why):
            // Nothing is applied before a journal is durable, so the image is still the
            // epoch before the one this journal would have been.
            try journal.clear()
            isMarkedUnsafe = false
            return .discarded(why)
        }
    }

    private func syncImageThenClearJournal() throws(GeminusError) {
        try sync()
        imageDirty = false
        try journal.clear()
        isMarkedUnsafe = false
    }

    // MARK: - Writes

    public func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
        try checkBounds(offset, UInt64(data.count))
        try injectCrash()
        try pwriteAll(fd, data, at: offset, what: "the replica disk \(path)")
    }

    /// A regular file: a punched hole (its blocks given back); a block device: BLKZEROOUT (zeros
    /// guaranteed, the device's write-zeroes command when it has one). Written zeros where
    /// neither works.
    public func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
        try checkBounds(offset, length)
        try injectCrash()
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

    private func checkBounds(_ offset: UInt64, _ length: UInt64) throws(GeminusError) {
        guard offset <= sizeBytes, length <= sizeBytes - offset else {
            throw GeminusError(.invalidArgument, "a disk write at \(offset)+\(length) is beyond the \(sizeBytes)-byte disk")
        }
    }

    private func injectCrash() throws(GeminusError) {
        guard let n = crashAfterRecordWrites else { return }
        guard n > 0 else { throw GeminusError(.internalInvariant, "simulated crash (test hook)") }
        crashAfterRecordWrites = n - 1
    }
}
