import GeminusCore
import Histogram

/// Figures of the checkpoint pipeline, as an operator and the benchmark read them. Latencies
/// are HdrHistograms in microseconds (3 significant digits, up to 100 s).
public struct PipelineStats: Sendable {
    public var epochs = 0
    public var fullEpochs = 0
    /// Pauses of delta checkpoints: what the guest feels in steady state.
    public var pauseMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    /// Pauses of full checkpoints (initial sync, resync), which copy all of RAM: kept apart so
    /// they neither hide in nor distort the steady-state figures.
    public var fullSyncPauseMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    public var captureMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    /// The parts of delta pauses: stopping the vCPUs, finding + copying dirty pages, saving
    /// the device state (when the guest measures them), resuming.
    public var stopMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    public var dirtyPagesMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    public var deviceStateMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    public var resumeMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    public var encodeMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    /// From the start of a checkpoint's pause to its acknowledgement.
    public var commitMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    /// Commits of full checkpoints (initial sync, resync), kept apart like their pauses.
    public var fullSyncCommitMicros = Histogram<UInt64>(highestTrackableValue: 100_000_000, numberOfSignificantValueDigits: .three)
    public var pagesCaptured = 0
    public var inputBytes = 0
    public var wireBytes = 0
    public var pagesByEncoding: [PageEncoding: Int] = [:]
    public var deferredEpochs = 0
    /// Rounds of the live first copy, and the pages they copied while the guest ran.
    public var liveRounds = 0
    public var livePages = 0

    public init() {}

    public var compressionRatio: Double { wireBytes == 0 ? 0 : Double(inputBytes) / Double(wireBytes) }

    public mutating func add(_ s: EncodeStats) {
        inputBytes += s.inputBytes
        wireBytes += s.wireBytes
        for (k, v) in s.pagesByEncoding { pagesByEncoding[k, default: 0] += v }
    }

    public static func percentiles(_ h: Histogram<UInt64>) -> [String: UInt64] {
        guard h.totalCount > 0 else { return [:] }
        return ["p50": h.valueAtPercentile(50), "p90": h.valueAtPercentile(90), "p99": h.valueAtPercentile(99),
                "p999": h.valueAtPercentile(99.9), "max": h.max, "count": h.totalCount]
    }
}
