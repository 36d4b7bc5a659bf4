/// One write the guest made to its disk in an epoch (or, in a full checkpoint, one stretch of
/// the whole disk): carried in the checkpoint stream with the epoch's memory and applied to the
/// replica disk only when the epoch commits (promise S2 for disks).
///
/// A write is either data (`data` holds the bytes) or a zero write: "this range now reads as
/// zeros" (`isZeroes`, `data` empty). Zero writes are what the primary's disk mirror produces
/// for WRITE_ZEROES and unallocated stretches: a mostly empty 20 GiB disk crosses the link as a
/// few records, not 20 GiB of zero bytes.
public struct DiskWrite: Equatable, Sendable {
    public var offset: UInt64
    public var data: [UInt8]
    /// The zeroed length of a zero write; nil for a data write.
    private var zeroedLength: UInt64?

    public init(offset: UInt64, data: [UInt8]) {
        self.offset = offset
        self.data = data
        zeroedLength = nil
    }

    /// `length` bytes from `offset` read as zeros.
    public static func zeroes(offset: UInt64, length: UInt64) -> DiskWrite {
        var w = DiskWrite(offset: offset, data: [])
        w.zeroedLength = length
        return w
    }

    public var isZeroes: Bool { zeroedLength != nil }
    /// Bytes of the disk this write covers (`data.count` for a data write).
    public var length: UInt64 { zeroedLength ?? UInt64(data.count) }
    /// The first byte after the write.
    public var end: UInt64 { offset &+ length }

    /// Record header on the wire (and in the replica's journal): offset u64, length u32,
    /// flags u32 (`zeroesFlag`; the field was reserved and sent as 0 before zero writes).
    public static let headerSize = 16
    /// Flags bit 0: a zero write; `length` is the zeroed length and no data follows.
    public static let zeroesFlag: UInt32 = 1
    /// The flags this version understands; a record with any other bit set is refused.
    public static let knownFlags: UInt32 = zeroesFlag
}

/// One epoch's disk writes, handed to the replica disk at the epoch's commit.
public struct DiskCommit: Sendable {
    public var epoch: Epoch
    /// In the order the guest made them.
    public var writes: [DiskWrite]
    /// A full epoch: the disk is zeroed first and `writes` are its non-zero stretches.
    public var replacesDisk: Bool
    /// A round of the live first copy: never resumable, so it needs no crash safety (see
    /// `JournaledReplicaDisk`).
    public var isLive: Bool

    public init(epoch: Epoch, writes: [DiskWrite], replacesDisk: Bool, isLive: Bool) {
        self.epoch = epoch
        self.writes = writes
        self.replacesDisk = replacesDisk
        self.isLive = isLive
    }
}

/// What reopening a replica disk found.
public enum DiskRecovery: Equatable, Sendable {
    /// Nothing pending: the image is the last epoch applied.
    case clean
    /// A committed epoch's journal was replayed: the image is that epoch.
    case replayed(Epoch)
    /// A torn or damaged journal was thrown away: its epoch never committed, the image is the
    /// epoch before it.
    case discarded(String)
    /// The image was being written without a journal (a live first copy, its marker found):
    /// it is no checkpoint, only a full epoch makes it one again.
    case notResumable
}

extension DiskWrite {
    /// `image` after `writes` in order (zeroed whole first when `replacing`): the bytes a
    /// replica disk must hold after them, for in-memory models of a disk.
    public static func applied(_ writes: [DiskWrite], to image: [UInt8], replacing: Bool = false) -> [UInt8] {
        var bytes = replacing ? [UInt8](repeating: 0, count: image.count) : image
        for w in writes {
            let range = Int(w.offset)..<Int(w.end)
            if w.isZeroes {
                bytes.replaceSubrange(range, with: repeatElement(0, count: range.count))
            } else {
                bytes.replaceSubrange(range, with: w.data)
            }
        }
        return bytes
    }
}

/// The secondary's copy of the guest's disk: the standby QEMU's disk file, written only at
/// commits.
public protocol ReplicaDisk: AnyObject {
    var sizeBytes: UInt64 { get }
    /// Writes `data` at `offset` (the whole buffer, or an error).
    func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError)
    /// Makes `length` bytes from `offset` read as zeros.
    func zero(offset: UInt64, length: UInt64) throws(GeminusError)
    /// Makes the whole disk read as zeros (before a full checkpoint, which sends only the
    /// non-zero stretches).
    func zeroAll() throws(GeminusError)
    /// Makes what was written durable.
    func sync() throws(GeminusError)
    /// Applies one committed epoch's writes. A disk that can outlive the process makes this
    /// crash-safe (`JournaledReplicaDisk`: through its journal); the default applies them in order.
    func commit(_ epoch: DiskCommit) throws(GeminusError)
    /// Finishes or discards what a crash interrupted, before the image is resumed. The default
    /// (a disk that dies with the process) has nothing to do.
    @discardableResult
    func recover() throws(GeminusError) -> DiskRecovery
}

extension ReplicaDisk {
    public func commit(_ epoch: DiskCommit) throws(GeminusError) {
        try applyInOrder(epoch)
    }

    @discardableResult
    public func recover() throws(GeminusError) -> DiskRecovery { .clean }

    /// Zeroes the whole disk for a full epoch, then applies every write in order; no sync.
    public func applyInOrder(_ epoch: DiskCommit) throws(GeminusError) {
        if epoch.replacesDisk { try zeroAll() }
        for w in epoch.writes {
            if w.isZeroes { try zero(offset: w.offset, length: w.length) } else { try write(offset: w.offset, w.data) }
        }
    }
}
