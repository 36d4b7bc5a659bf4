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
        let p = try #require(sim.primary?.node)
        // Held output leaves and the port passes output straight on, while the node still
        // calls the VM protected.
        p.port.releaseAll()
        sim.run(forNanos: 50_000_000)
        #expect(sim.result().violations.contains { $0.promise == .s2 }, "\(sim.result().violations)")
    }

    /// bounds: a queue over its limit is named.
    @Test func boundsCatchAnOverfullSendQueue() throws {
        let sim = try protectedPair()
        let p = try #require(sim.primary)
        let link = try #require(p.link)
        // The host hangs (nothing drains its socket buffer) with more queued than the machine's
        // window of epochs could ever put there.
        p.frozenUntilNanos = .max
        let frame = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(1), epoch: Epoch(1)), payload: [UInt8](repeating: 1, count: 60_000))
        while link.sendQueueBytes <= (sim.config.primary.maxEpochsInFlight + 1) * sim.maxEpochWireBytes {
            link.sendQueue.append((frame, nil))
            link.sendQueueBytes += frame.count
        }
        sim.step()
        #expect(sim.result().violations.contains { $0.promise == .bounds }, "\(sim.result().violations)")
    }
}

