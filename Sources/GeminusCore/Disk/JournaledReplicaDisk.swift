/// A replica disk kept crash-safe by a `DiskJournal`, written through a `BlockBackend`: a raw
/// file or block device in place (`FileReplicaDisk`), or a qcow2 image through QEMU's driver
/// (`GeminusQEMU.StorageDaemonReplicaDisk`). The contract is the backend's `sync` making what
/// was written durable; everything else is here, the same for every backend.
///
/// Replica disk durability (docs/PROTOCOL.md says the same):
/// - An epoch that is not live is applied through the journal: its writes go to the journal,
///   which is fdatasynced (and renamed into place, the directory fsynced); only then are they
///   applied to the image; the image is synced (fdatasync, or an NBD FLUSH that makes QEMU
///   write its qcow2 metadata and fdatasync); then the journal is truncated to nothing and that
///   fdatasynced. A crash before the journal is durable leaves the previous epoch's image
///   (nothing was applied yet); a crash after it leaves a journal that replays the epoch whole
///   when the disk is opened again or `recover()` runs. So the image is always one committed
///   epoch, never a mix of two.
/// - A full epoch that is not live (a resynchronisation while paused) goes through the journal
///   too, flagged to zero the disk first: replaying it is still idempotent, and its data is
///   bounded by `Replica.maxDiskBytesPerEpoch`, so the journal holds at most one epoch of it.
/// - Live epochs (rounds of the live first copy) are applied directly, without the journal:
///   until a whole paused checkpoint commits, the replica cannot be resumed anyway, and
///   journaling a whole disk's first copy would write it twice. Before the first direct write,
///   an "unsafe" marker is made durable in the journal's place, so a crash mid-copy is never
///   taken for a checkpoint (`recover()` answers `.notResumable`). The next journaled epoch
///   first syncs the image (the direct writes), then its journal replaces the marker.
public class JournaledReplicaDisk: ReplicaDisk {
    public let backend: any BlockBackend
    public let journal: DiskJournal
    public var sizeBytes: UInt64 { backend.sizeBytes }
    /// The image was written without the journal (live epochs): the journal holds the unsafe
    /// marker, and the image is no checkpoint until a journaled epoch commits.
    public private(set) var isMarkedUnsafe = false
    /// What the last `recover()` (the one in `init`, or the standby's before resuming) found:
    /// for the log, and for tests.
    public private(set) var lastRecovery: DiskRecovery = .clean
    /// Direct writes not yet synced (they must be before the marker goes).
    private var imageDirty = false

    /// Test hook: after this many more record writes (`write`/`zero`), the next fails as if the
    /// process died there (the journal and the half-applied image stay as a crash leaves them).
    var crashAfterRecordWrites: Int?

    /// Recovers whatever a crash left in the journal at `journalPath` onto `backend`.
    public init(backend: any BlockBackend, journalPath: String) throws(GeminusError) {
        self.backend = backend
        journal = DiskJournal(path: journalPath)
        try recover()
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
        try backend.write(offset: offset, data)
    }

    public func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
        try checkBounds(offset, length)
        try injectCrash()
        guard length > 0 else { return }
        try backend.zero(offset: offset, length: length)
    }

    public func zeroAll() throws(GeminusError) { try backend.zeroAll() }

    public func sync() throws(GeminusError) { try backend.sync() }

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
