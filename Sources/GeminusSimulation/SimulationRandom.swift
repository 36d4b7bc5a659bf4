import GeminusHypervisor

/// The run's random source: the project's xoshiro256** (the simulated guest already uses it),
/// with the draws the simulator needs. Each part of the world gets its own stream, split off
/// the one seed in a fixed order, so that turning one fault kind on or off does not shift the
/// draws of the others (the wall-clock proof depends on that).
public struct SimulationRandom: Sendable {
    private var x: Xoshiro256

    public init(seed: UInt64) { x = Xoshiro256(seed: seed) }

    public mutating func next() -> UInt64 { x.next() }

    /// A value in `range` (inclusive), uniformly enough for fault schedules.
    public mutating func uniform(_ range: ClosedRange<UInt64>) -> UInt64 {
        let span = range.upperBound - range.lowerBound
        if span == UInt64.max { return next() }
        return range.lowerBound + next() % (span + 1)
    }

    /// True with probability `perMillion` / 1,000,000.
    public mutating func chance(perMillion: UInt64) -> Bool {
        perMillion > 0 && next() % 1_000_000 < perMillion
    }

    /// A new independent stream.
    public mutating func split() -> SimulationRandom { SimulationRandom(seed: next()) }
}
