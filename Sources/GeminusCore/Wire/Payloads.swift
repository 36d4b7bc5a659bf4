/// How one page is carried inside a `pages` frame. Numbers are on the wire.
public enum PageEncoding: UInt8, Sendable, CaseIterable {
    /// All bytes zero; no data follows.
    case zero = 0
    /// The 4096 bytes as they are (LZ4 would not have made them smaller).
    case raw = 1
    /// An LZ4 block that decompresses to the page.
    case lz4 = 2
    /// An LZ4 block that decompresses to (page XOR the version the peer already holds).
    case xorLZ4 = 3
    /// Written but identical to the version the peer already holds; no data follows.
    case unchanged = 4

    /// Whether decoding needs the peer's previous version of the page.
    public var needsBase: Bool { self == .xorLZ4 || self == .unchanged }
}

/// The fixed part in front of each page's data inside a `pages` frame.
public struct PageRecordHeader: Equatable, Sendable {
    public static let size = 12
    public var pageIndex: UInt64
    public var encoding: PageEncoding
    public var length: UInt16

    public init(pageIndex: UInt64, encoding: PageEncoding, length: UInt16) {
        self.pageIndex = pageIndex
        self.encoding = encoding
        self.length = length
    }

    public func write(to w: inout ByteWriter) {
        w.u64(pageIndex)
        w.u8(encoding.rawValue)
        w.u8(0)
        w.u16(length)
    }
}

/// Payload of `epochBegin`: what the secondary needs to know before the first page arrives.
public struct EpochBegin: Equatable, Sendable {
    public static let size = 24
    /// A full epoch carries every page and replaces the replica; a delta applies on top of `baseEpoch`.
    public var isFull: Bool
    /// The epoch the secondary must have committed for this delta to apply (XOR bases).
    public var baseEpoch: Epoch
    /// The guest's size in pages: a mismatch means the two agents protect different VMs.
    public var guestPageCount: UInt64
    /// The size of the guest's replicated disk in 4 KiB units, 0 without one (these bytes were
    /// reserved before, sent as 0): a standby with another disk size, or none, refuses the epoch.
    public var diskUnits: UInt32
    /// A round of the live first copy, taken while the guest ran: applied as a base for the
    /// next epoch but never resumable (its pages may be torn and it has no device state).
    public var isLive: Bool

    public static let diskUnitBytes: UInt64 = 4096

    public init(isFull: Bool, baseEpoch: Epoch, guestPageCount: UInt64, diskUnits: UInt32 = 0, isLive: Bool = false) {
        self.isFull = isFull
        self.isLive = isLive
        self.baseEpoch = baseEpoch
        self.guestPageCount = guestPageCount
        self.diskUnits = diskUnits
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.size)
        w.u8(isFull ? 1 : 0)
        w.u8(isLive ? 1 : 0)
        w.zeros(2)
        w.u32(diskUnits)
        w.u64(baseEpoch.rawValue)
        w.u64(guestPageCount)
        return w.bytes
    }

    public init?(decoding bytes: [UInt8]) {
        var r = ByteReader(bytes)
        guard bytes.count == Self.size, let full = r.u8(), full <= 1, let live = r.u8(), live <= 1, r.skip(2), let disk = r.u32(),
              let base = r.u64(), let pages = r.u64() else { return nil }
        self.init(isFull: full == 1, baseEpoch: Epoch(base), guestPageCount: pages, diskUnits: disk, isLive: live == 1)
    }
}

/// Payload of `epochEnd`: the totals and digest that let the secondary prove it has the whole
/// epoch, exactly as captured, before it changes a single byte of the replica.
public struct EpochEnd: Equatable, Sendable {
    public static let size = 32
    /// Frames of this epoch before this one (begin, pages, device state).
    public var frameCount: UInt32
    public var pageCount: UInt32
    public var deviceStateBytes: UInt32
    /// Bytes of disk data in the epoch's `diskWrites` records (0 for a guest without a
    /// replicated disk; the field was reserved before, and sent as 0).
    public var diskBytes: UInt32
    /// XXH3-64 over (page index, decoded contents) of every page in order, then the device
    /// state, then (offset, data) of every disk write in order.
    public var digest: UInt64
    /// The guest's own progress marker at capture (for reports; not used to verify).
    public var captureMicros: UInt64

    public init(frameCount: UInt32, pageCount: UInt32, deviceStateBytes: UInt32, diskBytes: UInt32 = 0, digest: UInt64, captureMicros: UInt64 = 0) {
        self.frameCount = frameCount
        self.pageCount = pageCount
        self.deviceStateBytes = deviceStateBytes
        self.diskBytes = diskBytes
        self.digest = digest
        self.captureMicros = captureMicros
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.size)
        w.u32(frameCount)
        w.u32(pageCount)
        w.u32(deviceStateBytes)
        w.u32(diskBytes)
        w.u64(digest)
        w.u64(captureMicros)
        return w.bytes
    }

    public init?(decoding bytes: [UInt8]) {
        var r = ByteReader(bytes)
        guard bytes.count == Self.size, let f = r.u32(), let p = r.u32(), let d = r.u32(), let k = r.u32(),
              let g = r.u64(), let c = r.u64() else { return nil }
        self.init(frameCount: f, pageCount: p, deviceStateBytes: d, diskBytes: k, digest: g, captureMicros: c)
    }
}

/// Payload of `nack`: why the secondary threw an epoch away. The primary answers any nack with
/// a full resynchronisation, so the reason is for the logs and counters.
public struct Nack: Equatable, Sendable {
    public var reason: RejectReason
    public var detail: String

    public init(reason: RejectReason, detail: String) {
        self.reason = reason
        self.detail = detail
    }

    public static let maxDetailBytes = 512

    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.u16(reason.rawValue)
        w.u16(0)
        let text = Array(detail.utf8.prefix(Self.maxDetailBytes))
        w.u32(UInt32(text.count))
        w.append(text)
        return w.bytes
    }

    public init?(decoding bytes: [UInt8]) {
        var r = ByteReader(bytes)
        guard let code = r.u16(), let reason = RejectReason(rawValue: code), r.skip(2),
              let n = r.u32(), n <= Self.maxDetailBytes, let text = r.take(Int(n)) else { return nil }
        self.init(reason: reason, detail: String(decoding: text, as: UTF8.self))
    }
}
