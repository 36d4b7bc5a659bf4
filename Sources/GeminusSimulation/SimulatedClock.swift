/// The simulated world's two clocks. Every timeout in Geminus runs on the monotonic one; the
/// wall clock exists here only so that a fault can make it jump (NTP stepping, an operator
/// typing `date -s`) and the runs can show that nothing the machines decide depends on it.
public struct SimulatedClock: Sendable, Equatable {
    /// Nanoseconds since the start of the run. Only ever grows.
    public private(set) var monotonicNanos: UInt64 = 0
    /// Wall-clock time in nanoseconds since the Unix epoch (it starts on 2026-01-01). It may
    /// jump either way; `monotonicNanos` never does.
    public private(set) var wallNanos: Int64 = 1_767_225_600 * 1_000_000_000

    public init() {}

    public mutating func advance(byNanos n: UInt64) {
        monotonicNanos += n
        wallNanos += Int64(n)
    }

    public mutating func jumpWall(byNanos delta: Int64) {
        wallNanos += delta
    }
}

/// Fixed-width millisecond time for traces: "  1234.000ms" sorts and diffs well.
func formatMillis(_ nanos: UInt64) -> String {
    let ms = nanos / 1_000_000
    let frac = (nanos % 1_000_000) / 1000
    let f = String(frac)
    let s = "\(ms).\(String(repeating: "0", count: 3 - f.count))\(f)ms"
    return String(repeating: " ", count: max(0, 11 - s.count)) + s
}
