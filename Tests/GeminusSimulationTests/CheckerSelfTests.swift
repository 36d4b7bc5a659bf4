import Testing
import GeminusCore
import GeminusHypervisor
@testable import GeminusSimulation

/// The checkers are not vacuous: break a promise behind the real code's back and they say so.
@Suite struct CheckerSelfTests {
    func protectedPair(seed: UInt64 = 1) throws -> PairSimulator {
        var config = SimulationConfig(seed: seed)
        config.durationNanos = UInt64.max
        let sim = try PairSimulator(config: config)
        sim.run(forNanos: 200_000_000)
        #expect(sim.primaryProtection == .protected)
        return sim
    }

    /// S3: a byte of the replica changes without a commit (bit rot, a stray write).
    @Test func s3CatchesAReplicaThatDriftsFromEveryCapture() throws {
        let sim = try protectedPair()
        let replica = try #require(sim.secondary?.replica)
        // A cold page (the hot set is the first pages of the work area), so no epoch rewrites it.
        let address = 250 * GuestPage.size + 64
        replica.memory.storeU64(replica.memory.loadU64(at: address) ^ 1, at: address)
        sim.run(forNanos: 100_000_000)
        #expect(sim.result().violations.contains { $0.promise == .s3 }, "\(sim.result().violations)")
    }

    /// S2: output leaves while the VM is protected, without waiting for its epoch's ack.
    @Test func s2CatchesOutputReleasedBeforeItsAck() throws {
        let sim = try protectedPair()
        let p = try #require(sim.primary)
        _ = p.queue.setMode(.passThrough)
        sim.run(forNanos: 50_000_000)
        #expect(sim.result().violations.contains { $0.promise == .s2 }, "\(sim.result().violations)")
    }

    /// bounds: a queue over its limit is named.
    @Test func boundsCatchAnOverfullOutputQueue() throws {
        let sim = try protectedPair()
        let p = try #require(sim.primary)
        // A queue with a limit far above the configured one, filled past the configured one.
        p.queue = OutputQueue(limitBytes: 1 << 30, mode: .holding, openEpoch: p.queue.openEpoch)
        for _ in 0..<4096 { _ = p.queue.append(OutputPacket(sequence: 1, counter: 1, seed: 1).encoded(), bytes: 24) }
        sim.step()
        #expect(sim.result().violations.contains { $0.promise == .bounds }, "\(sim.result().violations)")
    }
}

