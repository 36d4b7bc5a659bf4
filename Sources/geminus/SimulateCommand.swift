import ArgumentParser
import Foundation
import GeminusSimulation

struct Simulate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the whole pair in one process under seeded faults and check its promises (S1, S2, S3, L1).",
        discussion: """
        Each seed is one deterministic run of the real replication state machines, encoder, \
        decoder, replica and output queue over a simulated clock, link and guest, with faults \
        drawn from the seed (docs/SIMULATION.md). The same seed always gives the same run, so a \
        failure prints the command that replays it and its event trace. The pair's witness (a \
        third Corosync node) is modelled and arbitrates; `--arbitration none` runs without it, \
        to show what it prevents: two running copies after a partition or a frozen primary are \
        then counted as known gaps, apart from violations. Exits 1 if any promise was broken.
        """)

    @Option(help: "How many seeds to run (default 100; 1 when --seed is given).") var seeds: Int?
    @Option(help: "The first seed (runs --seeds seeds from here).") var seed: UInt64?
    @Option(help: "Fault kinds, comma-separated, or all / none: \(FaultKind.allCases.map(\.rawValue).joined(separator: ", ")).")
    var faults = "all"
    @Option(help: "Simulated milliseconds (steps) per run.") var steps = 3000
    @Flag(help: "Print the summary as JSON.") var json = false
    @Flag(help: "Print the full event trace of each failing run (of the run itself when only one seed runs).") var trace = false
    @Option(help: "witness (the modelled third Corosync node decides who runs the VM) or none (no arbitration: split brains are counted as known gaps).")
    var arbitration = "witness"

    func validate() throws {
        if let seeds, seeds < 1 || seeds > 10_000_000 { throw ValidationError("--seeds must be 1...10000000") }
        // The observer keeps every released packet to judge later ones: 10 simulated minutes at most.
        guard steps >= 100 && steps <= 600_000 else { throw ValidationError("--steps must be 100...600000 (simulated milliseconds)") }
        do { _ = try FaultKind.parseList(faults) } catch { throw ValidationError(error.description) }
        guard ["witness", "none"].contains(arbitration) else { throw ValidationError("--arbitration must be witness or none") }
    }

    func run() throws {
        let kinds = try FaultKind.parseList(faults)
        let count = seeds ?? (seed == nil ? 100 : 1)
        let first = seed ?? 1
        var summary = SweepSummary()
        var failures: [RunResult] = []
        var lastProgress = Date()
        let start = Date()
        for i in 0..<count {
            let s = first &+ UInt64(i)
            var config = SimulationConfig(seed: s)
            config.durationNanos = UInt64(steps) * config.stepNanos
            if arbitration == "none" { config.setArbitration(.none) }
            let result: RunResult
            do {
                result = try PairSimulator(config: config, faults: kinds).run()
            } catch {
                throw operatorFailure(error)
            }
            summary.add(result)
            if !result.passed {
                failures.append(result)
                // Said at once: a long sweep's failures are worth looking at before it ends.
                FileHandle.standardError.write(Data("simulate: seed \(s) FAILED: \(result.violations.map(\.description).joined(separator: "; "))\n  replay: \(replayCommand(s, kinds))\n".utf8))
            }
            if count > 1 && (Date().timeIntervalSince(lastProgress) >= 1 || i == count - 1) {
                lastProgress = Date()
                let rate = Double(i + 1) / max(0.001, Date().timeIntervalSince(start))
                FileHandle.standardError.write(Data("simulate: \(i + 1)/\(count) seeds (last \(s)), \(summary.seedsFailed.count) failed, \(String(format: "%.1f", rate)) seeds/s\n".utf8))
            }
            if count == 1 && trace && !json {
                print(result.renderedTrace().joined(separator: "\n"))
            }
        }
        if json {
            printJSON(summary, failures, kinds: kinds)
        } else {
            printText(summary, failures, kinds: kinds, seconds: Date().timeIntervalSince(start))
        }
        if !failures.isEmpty { throw ExitCode(1) }
    }

    func replayCommand(_ seed: UInt64, _ kinds: Set<FaultKind>) -> String {
        let list = kinds.count == FaultKind.allCases.count ? "all" : (kinds.isEmpty ? "none" : kinds.sorted().map(\.rawValue).joined(separator: ","))
        return "geminus simulate --seed \(seed) --faults \(list) --steps \(steps)\(arbitration == "none" ? " --arbitration none" : "") --trace"
    }

    func printText(_ s: SweepSummary, _ failures: [RunResult], kinds: Set<FaultKind>, seconds: Double) {
        print("seeds run: \(s.seedsRun) (\(steps) ms of simulated time each, \(String(format: "%.1f", seconds)) s)")
        print("faults enabled: \(kinds.isEmpty ? "none" : kinds.sorted().map(\.rawValue).joined(separator: ","))")
        print("faults injected:")
        for (k, n) in s.faultsInjected.sorted(by: { $0.key < $1.key }) { print("  \(k): \(n)") }
        print("arbitration: \(arbitration == "none" ? "none (partitions may run the VM twice: counted as known gaps)" : "witness (third Corosync node)"); self-fences: \(s.selfFences)")
        print("takeovers: \(s.takeovers); primary lost but the secondary reported it could not take over: \(s.cannotTakeOver); epochs committed: \(s.epochsCommitted); resyncs: \(s.resyncs); stale frames and dials refused: \(s.staleFramesRefused)")
        print("violations by promise:")
        for p in Promise.allCases { print("  \(p.rawValue): \(s.violationsByPromise[p, default: 0])") }
        print("known gaps (\(knownGapLabel)), in \(s.seedsWithKnownGaps) seeds:")
        for p in Promise.allCases where s.knownGapsByPromise[p, default: 0] > 0 { print("  \(p.rawValue): \(s.knownGapsByPromise[p]!)") }
        if failures.isEmpty {
            print(s.seedsWithKnownGaps > 0 ? "result: no violation, but the known gaps above are split brains that arbitration prevents (run without --arbitration none)"
                                           : "result: every promise held in every seed")
            return
        }
        print("result: \(failures.count) seed(s) FAILED: \(failures.prefix(20).map { String($0.seed) }.joined(separator: " "))")
        for f in failures.prefix(trace ? failures.count : 1) {
            print("")
            print("seed \(f.seed) (faults drawn: \(f.faultKinds.map(\.rawValue).joined(separator: ",")))")
            for v in f.violations { print("  \(v)") }
            print("replay: \(replayCommand(f.seed, kinds))")
            print("event trace\(trace ? "" : " (notable events; --trace for all)"):")
            print(f.renderedTrace(notableOnly: !trace).joined(separator: "\n"))
        }
    }

    func printJSON(_ s: SweepSummary, _ failures: [RunResult], kinds: Set<FaultKind>) {
        let object: [String: Any] = [
            "seedsRun": s.seedsRun,
            "stepsPerSeed": steps,
            "faultsEnabled": kinds.sorted().map(\.rawValue),
            "faultsInjected": s.faultsInjected,
            "takeovers": s.takeovers,
            "cannotTakeOver": s.cannotTakeOver,
            "epochsCommitted": s.epochsCommitted,
            "resyncs": s.resyncs,
            "staleRefused": s.staleFramesRefused,
            "arbitration": arbitration,
            "selfFences": s.selfFences,
            "violationsByPromise": Dictionary(uniqueKeysWithValues: Promise.allCases.map { ($0.rawValue, s.violationsByPromise[$0, default: 0]) }),
            "knownGaps": ["label": knownGapLabel, "seeds": s.seedsWithKnownGaps,
                          "byPromise": Dictionary(uniqueKeysWithValues: s.knownGapsByPromise.map { ($0.key.rawValue, $0.value) })] as [String: Any],
            "failures": failures.map { f -> [String: Any] in
                ["seed": f.seed, "faultsDrawn": f.faultKinds.map(\.rawValue), "replay": replayCommand(f.seed, kinds),
                 "violations": f.violations.map { ["promise": $0.promise.rawValue, "atMillis": Double($0.atNanos) / 1e6, "message": $0.message] },
                 "trace": f.renderedTrace(notableOnly: !trace)]
            },
        ]
        let data = try! JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    }
}
