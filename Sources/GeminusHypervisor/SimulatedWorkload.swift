import GeminusCore

/// What the simulated guest writes. Each mode stands for a kind of real guest memory, so the
/// encoder's choices (zero marker, XOR, LZ4, raw) are all exercised and measured.
public enum PageContent: String, Sendable, CaseIterable, Codable {
    /// Freed memory being cleared.
    case zeros
    /// Log lines, JSON, source text: LZ4 halves it or better.
    case text
    /// Encrypted or compressed data: nothing helps.
    case random
    /// A few words changed in a page written before: the common case for a running
    /// database or billing process, where XOR+LZ4 shrinks the page to tens of bytes.
    case smallEdits
    /// A blend of the above in proportions seen in long-running servers.
    case mixed
}

/// How the simulated guest behaves. The same workload and seed produce the same sequence of
/// writes and outputs, byte for byte.
public struct SimulatedWorkload: Sendable, Equatable, Codable {
    public var ramMiB: Int
    /// Pages written per second of guest time (one page per step).
    public var dirtyPagesPerSecond: Int
    /// Fraction of the work area that takes `hotShare` of the writes (locality).
    public var hotFraction: Double
    public var hotShare: Double
    public var content: PageContent
    /// Output packets per second of guest time.
    public var outputsPerSecond: Int
    public var seed: UInt64
    /// Whether every output with an even sequence number leaves as an Ethernet frame through the
    /// NIC (`GuestOutputPort.offerFrame`) instead of as a console line (`offer`).
    public var nicFrames = false
    /// Blocks of 4 KiB in the guest's disk (0: no disk). The disk lives in memory; its writes go
    /// into each checkpoint's disk writes, the whole disk into a full one.
    public var diskBlocks = 0
    /// With a disk: one block written every this many steps.
    public var diskWriteEverySteps = 64

    public init(ramMiB: Int = 64, dirtyPagesPerSecond: Int = 20_000, hotFraction: Double = 0.05, hotShare: Double = 0.9,
                content: PageContent = .mixed, outputsPerSecond: Int = 500, seed: UInt64 = 1) {
        self.ramMiB = ramMiB
        self.dirtyPagesPerSecond = dirtyPagesPerSecond
        self.hotFraction = hotFraction
        self.hotShare = hotShare
        self.content = content
        self.outputsPerSecond = outputsPerSecond
        self.seed = seed
    }

    public var pageCount: Int { ramMiB << 20 / GuestPage.size }
    public var diskSizeBytes: Int { diskBlocks * SimulatedGuest.diskBlockSize }

    /// Refuses workloads the simulated guest cannot run, with the reason.
    public func validate() throws(GeminusError) {
        guard ramMiB >= 1 && ramMiB <= 64 << 10 else {
            throw GeminusError(.invalidArgument, "guest RAM of \(ramMiB) MiB is outside 1 MiB...64 GiB")
        }
        guard dirtyPagesPerSecond >= 1 && dirtyPagesPerSecond <= 10_000_000 else {
            throw GeminusError(.invalidArgument, "dirty rate \(dirtyPagesPerSecond) pages/s is outside 1...10,000,000")
        }
        guard hotFraction > 0 && hotFraction <= 1 && hotShare >= 0 && hotShare <= 1 else {
            throw GeminusError(.invalidArgument, "locality: hot fraction must be in (0, 1] and hot share in [0, 1]")
        }
        guard outputsPerSecond >= 0 && outputsPerSecond <= dirtyPagesPerSecond else {
            throw GeminusError(.invalidArgument, "outputs per second (\(outputsPerSecond)) must be between 0 and the dirty rate (one output at most per step)")
        }
        guard diskBlocks >= 0 && diskBlocks <= 65_536 && diskWriteEverySteps >= 1 else {
            throw GeminusError(.invalidArgument, "disk of \(diskBlocks) blocks (0...65,536), a write every \(diskWriteEverySteps) steps (at least 1)")
        }
    }
}

/// xoshiro256**: small, fast, and its whole state fits in the device-state blob, so a resumed
/// guest continues the exact same random sequence.
public struct Xoshiro256: RandomNumberGenerator, Sendable, Equatable {
    public var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var x = seed
        func splitmix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    public init(state: (UInt64, UInt64, UInt64, UInt64)) { s = state }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }

    public static func == (a: Xoshiro256, b: Xoshiro256) -> Bool { a.s == b.s }
}
