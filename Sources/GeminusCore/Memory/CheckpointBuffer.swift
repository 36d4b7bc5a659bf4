#if canImport(Glibc)
import Glibc
#endif

/// Pages copied out of the guest at one checkpoint, plus its device state: what a capture
/// produces on the primary and what a decoded epoch stages on the secondary. It is reused from
/// epoch to epoch so the steady state allocates nothing, and it never grows past `limitPages`.
///
/// Ownership moves between threads (capture, then encode); it is never shared at once.
public final class CheckpointBuffer: @unchecked Sendable {
    public let limitPages: Int
    public private(set) var pageIndices: [Int] = []
    public var deviceState: [UInt8] = []
    /// The epoch's disk writes in the order the guest made them (a full checkpoint: every
    /// non-zero stretch of the disk). A zero write is one record on the wire (split at 4 GiB),
    /// and the secondary stages one write per record: the digest is over records.
    public var diskWrites: [DiskWrite] = []
    /// The size of the guest's replicated disk (a multiple of 4 KiB), 0 without one.
    public var diskSizeBytes: UInt64 = 0
    /// A full checkpoint holds every page of the guest.
    public var isFull = false
    /// Copied while the guest ran (a round of the live first copy): possibly torn pages and no
    /// device state. It is a base for the next epoch, never a checkpoint to resume.
    public var isLive = false
    private var storage: UnsafeMutableRawPointer
    private var capacityPages: Int

    public init(limitPages: Int, initialCapacityPages: Int = 256) {
        precondition(limitPages > 0)
        self.limitPages = limitPages
        capacityPages = max(1, min(initialCapacityPages, limitPages))
        storage = UnsafeMutableRawPointer.allocate(byteCount: capacityPages * GuestPage.size, alignment: GuestPage.size)
    }

    deinit { storage.deallocate() }

    public var pageCount: Int { pageIndices.count }
    public var payloadBytes: Int { pageIndices.count * GuestPage.size + deviceState.count + diskBytes }
    /// Data bytes of the disk writes (a zero write carries none).
    public var diskBytes: Int { diskWrites.reduce(0) { $0 + ($1.isZeroes ? 0 : $1.data.count) } }

    public func reset() {
        pageIndices.removeAll(keepingCapacity: true)
        deviceState.removeAll(keepingCapacity: true)
        diskWrites.removeAll(keepingCapacity: true)
        diskSizeBytes = 0
        isFull = false
        isLive = false
    }

    /// Contents of the i-th page held (not the guest page number: see `pageIndices`).
    @inline(__always)
    public func contents(at i: Int) -> UnsafeMutableRawPointer {
        precondition(i >= 0 && i < pageIndices.count)
        return storage + i * GuestPage.size
    }

    /// Reserves room for one more page and returns where its 4096 bytes go.
    /// Returns nil at the limit: the caller decides whether that is a rejection or a bug.
    public func appendPage(index: Int) -> UnsafeMutableRawPointer? {
        guard pageIndices.count < limitPages else { return nil }
        if pageIndices.count == capacityPages { grow() }
        pageIndices.append(index)
        return storage + (pageIndices.count - 1) * GuestPage.size
    }

    public func appendPage(index: Int, copying source: UnsafeRawPointer) -> Bool {
        guard let dst = appendPage(index: index) else { return false }
        dst.copyMemory(from: source, byteCount: GuestPage.size)
        return true
    }

    private func grow() {
        let newCapacity = min(limitPages, capacityPages * 2)
        let fresh = UnsafeMutableRawPointer.allocate(byteCount: newCapacity * GuestPage.size, alignment: GuestPage.size)
        fresh.copyMemory(from: storage, byteCount: pageIndices.count * GuestPage.size)
        storage.deallocate()
        storage = fresh
        capacityPages = newCapacity
    }

    /// The digest the wire format carries in `epochEnd` (see `ContentDigest`).
    public func digest() -> UInt64 {
        var d = ContentDigest()
        for i in pageIndices.indices { d.addPage(index: UInt64(pageIndices[i]), contents: contents(at: i)) }
        deviceState.withUnsafeBytes { d.add($0) }
        for w in diskWrites { d.addDiskWrite(w) }
        return d.value
    }
}
