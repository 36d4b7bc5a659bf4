import Histogram

/// Latencies in microseconds with the percentiles the benchmark reports (HdrHistogram, three
/// significant digits, up to 100 s).
public struct LatencyMicros: Sendable {
    public private(set) var histogram = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)

    public init() {}

    public mutating func record(nanos: UInt64) { _ = histogram.record(nanos / 1000) }
    public mutating func record(micros: UInt64) { _ = histogram.record(micros) }

    public var count: Int { Int(histogram.totalCount) }
    public func percentile(_ p: Double) -> UInt64 { histogram.totalCount == 0 ? 0 : histogram.valueAtPercentile(p) }
    public var p50: UInt64 { percentile(50) }
    public var p99: UInt64 { percentile(99) }
    public var max: UInt64 { histogram.totalCount == 0 ? 0 : histogram.max }

    /// p50/p90/p99/p99.9/max and count, for JSON.
    public var summary: [String: UInt64] {
        ["p50": percentile(50), "p90": percentile(90), "p99": percentile(99), "p999": percentile(99.9),
         "max": max, "count": UInt64(count)]
    }
}

/// The median of a few samples (the scaling runs take 5-9 each).
func median(_ xs: [UInt64]) -> UInt64 {
    guard !xs.isEmpty else { return 0 }
    let s = xs.sorted()
    return s[s.count / 2]
}
