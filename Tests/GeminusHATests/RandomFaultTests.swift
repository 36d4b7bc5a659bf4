import Foundation
import Testing
@testable import GeminusHA

/// Many seeded fault schedules on the simulated cluster: nodes die and return, are cut off and
/// reconnected, fence agents fail and recover, at most two of five nodes at a time (so a
/// majority stays quorate). After every step no VM may run on two hosts; once everything is
/// healed every HA VM must run exactly once (none dropped). A failing seed replays exactly.
struct RandomFaultTests {
    struct SplitMix: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    static let seeds = Array(UInt64(1)...UInt64(100))

    @Test(arguments: seeds)
    func oneCopyAlwaysAndNothingDropped(seed: UInt64) throws {
        try schedule(seed: seed, maxBadNodes: 2, expectAllRunning: true)
    }

    /// Majorities lost too (three of five bad): no quorum, VMs may stay down until it returns
    /// — and a node back before the cluster noticed its death takes its VMs' memory with it —
    /// but never two copies.
    @Test(arguments: seeds.map { $0 + 10_000 })
    func oneCopyEvenWhenQuorumIsLost(seed: UInt64) throws {
        try schedule(seed: seed, maxBadNodes: 3, expectAllRunning: false)
    }

    func schedule(seed: UInt64, maxBadNodes: Int, expectAllRunning: Bool) throws {
        var rng = SplitMix(state: seed)
        let w = HAWorld()
        let names = ["n1", "n2", "n3", "n4", "n5"]
        var script: [String] = []
        func run(_ line: String) throws {
            script.append(line)
            try w.run(line)
        }
        try run("nodes n1 n2 n3 n4 n5 ram 16384")
        let vms = (1...8).map { "vm\($0)" }
        for (i, vm) in vms.enumerated() {
            try run("vm \(vm) on \(names[i % 5]) ram \(1024 * (1 + i % 3)) priority \(i % 2)")
        }
        try run("start")
        // Chosen against the world as it is (a fence may have powered a cut-off node off).
        var cut: Set<String> = []
        var fenceBroken: Set<String> = []
        func down() -> Set<String> { Set(w.nodes.filter { !$0.powered }.map(\.node.name)) }
        for _ in 0..<14 {
            cut.subtract(down())
            let bad = down().count + cut.count
            let n = names[Int(rng.next() % 5)]
            let healthy = !down().contains(n) && !cut.contains(n)
            switch rng.next() % 6 {
            case 0 where bad < maxBadNodes && healthy: try run("node \(n) fails")
            case 1 where down().contains(n): try run("node \(n) returns")
            case 2 where bad < maxBadNodes && healthy: try run("network \(n) off"); cut.insert(n)
            case 3 where cut.contains(n): try run("network \(n) on"); cut.remove(n)
            case 4:
                if fenceBroken.contains(n) { try run("fence \(n) works"); fenceBroken.remove(n) } else { try run("fence \(n) fails"); fenceBroken.insert(n) }
            default: try run("wait \(1 + rng.next() % 8)s")
            }
        }
        // Heal: fences work, cut-off nodes come back, dead ones boot again.
        for n in fenceBroken.sorted() { try run("fence \(n) works") }
        try run("wait 12s")
        cut.subtract(down())
        for n in cut.sorted() { try run("network \(n) on") }
        for n in down().sorted() { try run("node \(n) returns") }
        try run("wait 30s")
        let story = "seed \(seed):\n" + script.joined(separator: "\n") + "\n--- log ---\n" + w.log.suffix(60).joined(separator: "\n")
        #expect(w.violations.isEmpty, "\(story)")
        var runs: [String: [String]] = [:]
        for node in w.nodes where node.powered {
            for v in node.vms { runs[v.name, default: []].append(node.node.name) }
        }
        for vm in vms {
            #expect((runs[vm]?.count ?? 0) <= 1, "\(vm) runs on \(runs[vm] ?? []) at the end\n\(story)")
            guard expectAllRunning else { continue }
            #expect(runs[vm]?.count == 1, "\(vm) runs on \(runs[vm] ?? []) at the end\n\(story)")
        }
    }
}
