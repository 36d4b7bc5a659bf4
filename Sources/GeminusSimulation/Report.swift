/// The promises the checkers hold the pair to (docs/SIMULATION.md, DESIGN.md "Promises").
public enum Promise: String, CaseIterable, Sendable, Comparable, Codable {
    /// At most one running copy of the VM.
    case s1 = "S1"
    /// Output commit: released output comes from a committed state, and the resumed VM's
    /// history contains all of it (nothing is ever "un-sent").
    case s2 = "S2"
    /// The replica is always the guest exactly as captured at one acknowledged epoch.
    case s3 = "S3"
    /// Failover within the configured bound after the primary is lost.
    case l1 = "L1"
    /// The resumed guest's counter is never below that of the last released output.
    case resumedCounter = "resumed-counter"
    /// Every queue stays within its limit.
    case bounds = "bounds"

    public static func < (a: Promise, b: Promise) -> Bool { a.rawValue < b.rawValue }
}

/// One broken promise, when, and what exactly was seen.
public struct Violation: Sendable, Equatable, Codable, CustomStringConvertible {
    public var promise: Promise
    public var atNanos: UInt64
    public var message: String
    public var description: String { "\(formatMillis(atNanos).trimmed()) \(promise.rawValue): \(message)" }
}

/// The label every known-gap finding carries, so that no report can present one as a pass.
public let knownGapLabel = "run without arbitration"

/// What one seed's run did and found.
public struct RunResult: Sendable {
    public var seed: UInt64
    /// The fault kinds this run drew from those enabled.
    public var faultKinds: [FaultKind]
    /// How often each fault was actually injected ("primary-crash:during-send", "loss", ...).
    public var faultsInjected: [String: Int]
    /// Broken promises: each one is a bug (in the code or in the simulator) to fix.
    public var violations: [Violation]
    /// Promises broken only because the run had no arbitration (`--arbitration none`): a
    /// partition or a frozen primary lets both copies run. Counted apart, never dropped.
    /// With the witness (the default) there are none: such a break is a violation.
    public var knownGaps: [Violation]
    public var tookOver: Bool
    public var takeoverAtNanos: UInt64?
    public var epochsCommitted: Int
    public var fullCheckpoints: Int
    public var resyncs: Int
    public var outputsReleased: Int
    public var staleFramesRefused: Int
    public var staleDialsRefused: Int
    /// The primary was lost and the secondary said it could not take over (nothing whole to
    /// resume, or a resync was under way): the VM is down and reported, not rolled back.
    public var cannotTakeOver: Bool
    /// Times a primary stopped its guest for good because its witness said it might lose the VM.
    public var selfFences: Int = 0
    public var trace: [TraceEvent]

    public var passed: Bool { violations.isEmpty }

    /// The trace as text, one event a line; `notableOnly` keeps the story, drops per-epoch detail.
    public func renderedTrace(notableOnly: Bool = false) -> [String] {
        trace.filter { !notableOnly || $0.notable }.map(\.line)
    }
}

/// One thing that happened, at simulated time `atNanos`, on `node`.
public struct TraceEvent: Sendable, Equatable, Codable {
    public var atNanos: UInt64
    public var node: String
    public var text: String
    /// Notable events make the scenario logs; the rest (each capture, frame, ack) is detail.
    public var notable: Bool

    public var line: String { "\(formatMillis(atNanos)) \(node): \(text)" }
}

/// Many seeds' results, summed for the CLI and the sweep tests.
public struct SweepSummary: Sendable {
    public var seedsRun = 0
    public var seedsFailed: [UInt64] = []
    public var faultsInjected: [String: Int] = [:]
    public var violationsByPromise: [Promise: Int] = [:]
    public var knownGapsByPromise: [Promise: Int] = [:]
    public var seedsWithKnownGaps = 0
    public var takeovers = 0
    public var cannotTakeOver = 0
    public var epochsCommitted = 0
    public var resyncs = 0
    public var fullCheckpoints = 0
    public var staleFramesRefused = 0
    public var selfFences = 0

    public init() {}

    public mutating func add(_ r: RunResult) {
        seedsRun += 1
        if !r.passed { seedsFailed.append(r.seed) }
        for (k, n) in r.faultsInjected { faultsInjected[k, default: 0] += n }
        for v in r.violations { violationsByPromise[v.promise, default: 0] += 1 }
        for v in r.knownGaps { knownGapsByPromise[v.promise, default: 0] += 1 }
        if !r.knownGaps.isEmpty { seedsWithKnownGaps += 1 }
        if r.tookOver { takeovers += 1 }
        if r.cannotTakeOver { cannotTakeOver += 1 }
        epochsCommitted += r.epochsCommitted
        resyncs += r.resyncs
        fullCheckpoints += r.fullCheckpoints
        staleFramesRefused += r.staleFramesRefused + r.staleDialsRefused
        selfFences += r.selfFences
    }
}
