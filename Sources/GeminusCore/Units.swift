/// Guest memory is replicated in units of 4 KiB pages, the x86 base page size and the unit in
/// which QEMU, the kernel's write tracking and the shared RAM file all account for memory.
public enum GuestPage {
    public static let size = 4096
    public static let shift = 12
    /// The most pages a peer may announce: 16 TiB of guest RAM, beyond any KVM guest today.
    /// Values from the wire are checked against it before they are multiplied by the page
    /// size, converted to Int or used to size an allocation.
    public static let maxCount: UInt64 = 1 << 32
}

/// A checkpoint number. Epoch 0 means "nothing committed yet"; the first checkpoint is 1 and
/// numbers only grow within a generation.
public struct Epoch: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static let none = Epoch(0)
    /// The highest epoch accepted from the wire. A pair counts one per checkpoint and never
    /// gets near it (2^62 checkpoints at 1 per millisecond is 146 million years); the margin
    /// means `next` on any accepted epoch, and on every epoch after it, cannot overflow.
    public static let maxAccepted = Epoch(1 << 62)
    public var isAcceptable: Bool { self <= Self.maxAccepted }
    public var next: Epoch {
        precondition(rawValue < UInt64.max, "epoch overflow: wire epochs must be checked against Epoch.maxAccepted")
        return Epoch(rawValue + 1)
    }
    public static func < (a: Epoch, b: Epoch) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}

/// The pair's fencing token. It is bumped at every takeover; anything carrying an older one
/// comes from a deposed primary and is refused (promise S1).
public struct Generation: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    /// The highest generation accepted from the wire (a hello, a witness record). One is used
    /// per takeover, so a real pair never gets near it; the margin means `next` on any accepted
    /// generation, and the takeovers after it, cannot overflow.
    public static let maxAccepted = Generation(1 << 62)
    public var isAcceptable: Bool { self <= Self.maxAccepted }
    public var next: Generation {
        precondition(rawValue < UInt64.max, "generation overflow: wire generations must be checked against Generation.maxAccepted")
        return Generation(rawValue + 1)
    }
    public static func < (a: Generation, b: Generation) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}
