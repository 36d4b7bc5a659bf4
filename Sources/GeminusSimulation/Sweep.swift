import Foundation
import GeminusCore

/// `geminus simulate`: many seeds, one after another, each one deterministic run of the pair;
/// the failures kept with the command that replays each.
public struct SimulationSweep: Sendable {
    /// How many seeds, from `firstSeed` on.
    public var count: Int
    public var firstSeed: UInt64
    public var faults: Set<FaultKind>
    /// Simulated milliseconds (steps) per run.
    public var steps: Int
    /// The modelled witness arbitrates (the default); false: no arbitration, split brains
    /// are counted as known gaps.
    public var arbitrated: Bool
    /// Every failure's full event trace in the report (else the notable events of the first).
    public var trace: Bool

    public init(count: Int, firstSeed: UInt64, faults: Set<FaultKind>, steps: Int, arbitrated: Bool, trace: Bool) {
        self.count = count
        self.firstSeed = firstSeed
        self.faults = faults
        self.steps = steps
        self.arbitrated = arbitrated
        self.trace = trace
    }

    /// What a sweep found, and how long it took.
    public struct Outcome: Sendable {
        public var summary = SweepSummary()
        public var failures: [RunResult] = []
        public var seconds = 0.0
        public var passed: Bool { failures.isEmpty }
    }

    /// Runs every seed. `progress` receives the lines for standard error (each failure as it
    /// happens, the rate about once a second); `eachRun` every seed's result as it ends.
    /// Throws when a run cannot be set up (the simulator's configuration is refused).
    public func run(progress: (String) -> Void, eachRun: (RunResult) -> Void = { _ in }) throws(GeminusError) -> Outcome {
        var outcome = Outcome()
        var lastProgress = Date()
        let start = Date()
        for i in 0..<count {
            let s = firstSeed &+ UInt64(i)
            var config = SimulationConfig(seed: s)
            config.durationNanos = UInt64(steps) * config.stepNanos
            if !arbitrated { config.setArbitration(.none) }
            let result = try PairSimulator(config: config, faults: faults).run()
            outcome.summary.add(result)
            if !result.passed {
                outcome.failures.append(result)
                // Said at once: a long sweep's failures are worth looking at before it ends.
                progress("simulate: seed \(s) FAILED: \(result.violations.map(\.description).joined(separator: "; "))\n  replay: \(replayCommand(s))")
            }
            if count > 1 && (Date().timeIntervalSince(lastProgress) >= 1 || i == count - 1) {
                lastProgress = Date()
                let rate = Double(i + 1) / max(0.001, Date().timeIntervalSince(start))
                progress("simulate: \(i + 1)/\(count) seeds (last \(s)), \(outcome.summary.seedsFailed.count) failed, \(String(format: "%.1f", rate)) seeds/s")
            }
            eachRun(result)
        }
        outcome.seconds = Date().timeIntervalSince(start)
        return outcome
    }

    /// The command that runs `seed` again, with its full trace.
    public func replayCommand(_ seed: UInt64) -> String {
        let list = faults.count == FaultKind.allCases.count ? "all" : (faults.isEmpty ? "none" : faults.sorted().map(\.rawValue).joined(separator: ","))
        return "geminus simulate --seed \(seed) --faults \(list) --steps \(steps)\(arbitrated ? "" : " --arbitration none") --trace"
    }

    /// The report as text, one line each.
    public func textLines(_ o: Outcome) -> [String] {
        let s = o.summary
        var out: [String] = []
        out.append("seeds run: \(s.seedsRun) (\(steps) ms of simulated time each, \(String(format: "%.1f", o.seconds)) s)")
        out.append("faults enabled: \(faults.isEmpty ? "none" : faults.sorted().map(\.rawValue).joined(separator: ","))")
        out.append("faults injected:")
        for (k, n) in s.faultsInjected.sorted(by: { $0.key < $1.key }) { out.append("  \(k): \(n)") }
        out.append("arbitration: \(arbitrated ? "witness (third Corosync node)" : "none (partitions may run the VM twice: counted as known gaps)"); self-fences: \(s.selfFences)")
        out.append("takeovers: \(s.takeovers); primary lost but the secondary reported it could not take over: \(s.cannotTakeOver); epochs committed: \(s.epochsCommitted); resyncs: \(s.resyncs); stale frames and dials refused: \(s.staleFramesRefused)")
        out.append("violations by promise:")
        for p in Promise.allCases { out.append("  \(p.rawValue): \(s.violationsByPromise[p, default: 0])") }
        out.append("known gaps (\(knownGapLabel)), in \(s.seedsWithKnownGaps) seeds:")
        for p in Promise.allCases where s.knownGapsByPromise[p, default: 0] > 0 { out.append("  \(p.rawValue): \(s.knownGapsByPromise[p]!)") }
        let failures = o.failures
        if failures.isEmpty {
            out.append(s.seedsWithKnownGaps > 0 ? "result: no violation, but the known gaps above are split brains that arbitration prevents (run without --arbitration none)"
                                                : "result: every promise held in every seed")
            return out
        }
        out.append("result: \(failures.count) seed(s) FAILED: \(failures.prefix(20).map { String($0.seed) }.joined(separator: " "))")
        for f in failures.prefix(trace ? failures.count : 1) {
            out.append("")
            out.append("seed \(f.seed) (faults drawn: \(f.faultKinds.map(\.rawValue).joined(separator: ",")))")
            for v in f.violations { out.append("  \(v)") }
            out.append("replay: \(replayCommand(f.seed))")
            out.append("event trace\(trace ? "" : " (notable events; --trace for all)"):")
            out.append(f.renderedTrace(notableOnly: !trace).joined(separator: "\n"))
        }
        return out
    }

    /// The report `--json` prints.
    public func json(_ o: Outcome) -> [String: Any] {
        let s = o.summary
        return [
            "seedsRun": s.seedsRun,
            "stepsPerSeed": steps,
            "faultsEnabled": faults.sorted().map(\.rawValue),
            "faultsInjected": s.faultsInjected,
            "takeovers": s.takeovers,
            "cannotTakeOver": s.cannotTakeOver,
            "epochsCommitted": s.epochsCommitted,
            "resyncs": s.resyncs,
            "staleRefused": s.staleFramesRefused,
            "arbitration": arbitrated ? "witness" : "none",
            "selfFences": s.selfFences,
            "violationsByPromise": Dictionary(uniqueKeysWithValues: Promise.allCases.map { ($0.rawValue, s.violationsByPromise[$0, default: 0]) }),
            "knownGaps": ["label": knownGapLabel, "seeds": s.seedsWithKnownGaps,
                          "byPromise": Dictionary(uniqueKeysWithValues: s.knownGapsByPromise.map { ($0.key.rawValue, $0.value) })] as [String: Any],
            "failures": o.failures.map { f -> [String: Any] in
                ["seed": f.seed, "faultsDrawn": f.faultKinds.map(\.rawValue), "replay": replayCommand(f.seed),
                 "violations": f.violations.map { ["promise": $0.promise.rawValue, "atMillis": Double($0.atNanos) / 1e6, "message": $0.message] },
                 "trace": f.renderedTrace(notableOnly: !trace)]
            },
        ]
    }
}
