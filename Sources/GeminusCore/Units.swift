/// Guest memory is replicated in units of 4 KiB pages, the x86 base page size and the unit in
/// which QEMU, the kernel's write tracking and the shared RAM file all account for memory.
public enum GuestPage {
    public static let size = 4096
    public static let shift = 12
}

/// A checkpoint number. Epoch 0 means "nothing committed yet"; the first checkpoint is 1 and
/// numbers only grow within a generation.
public struct Epoch: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static let none = Epoch(0)
    public var next: Epoch { Epoch(rawValue + 1) }
    public static func < (a: Epoch, b: Epoch) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}

/// The pair's fencing token. It is bumped at every takeover; anything carrying an older one
/// comes from a deposed primary and is refused (promise S1).
public struct Generation: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public var next: Generation { Generation(rawValue + 1) }
    public static func < (a: Generation, b: Generation) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}
