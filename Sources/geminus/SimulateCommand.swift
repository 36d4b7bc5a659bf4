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
        let count = seeds ?? (seed == nil ? 100 : 1)
        let sweep = SimulationSweep(count: count, firstSeed: seed ?? 1, faults: try FaultKind.parseList(faults), steps: steps,
                                    arbitrated: arbitration != "none", trace: trace)
        let outcome: SimulationSweep.Outcome
        do {
            outcome = try sweep.run(progress: { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }, eachRun: { result in
                if count == 1 && trace && !json { print(result.renderedTrace().joined(separator: "\n")) }
            })
        } catch {
            throw operatorFailure(error)
        }
        if json {
            let data = try! JSONSerialization.data(withJSONObject: sweep.json(outcome), options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            for line in sweep.textLines(outcome) { print(line) }
        }
        if !outcome.passed { throw ExitCode(1) }
    }
}
