import Testing
import GeminusSimulation

@Suite struct SimulationSweepTests {
    @Test func exploratory() throws {
        var summary = SweepSummary()
        for seed in UInt64(1)...UInt64(40) {
            let sim = try PairSimulator(config: SimulationConfig(seed: seed), faults: Set(FaultKind.allCases))
            let r = sim.run()
            summary.add(r)
            if !r.passed {
                print("seed \(seed) kinds \(r.faultKinds.map(\.rawValue)): \(r.violations.map(\.description))")
                print(r.renderedTrace(notableOnly: true).suffix(40).joined(separator: "\n"))
            }
        }
        print(summary)
    }
}
