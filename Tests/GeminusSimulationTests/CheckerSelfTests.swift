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

    /// The guest's NIC frames and disk writes are really exercised: both kinds of output leave,
    /// and the replica disk is written at commits.
    @Test func framesAndDiskWritesAreExercised() throws {
        let sim = try protectedPair()
        sim.run(forNanos: 300_000_000)
        #expect(sim.framesReleased > 0 && sim.linesReleased > 0, "frames \(sim.framesReleased), lines \(sim.linesReleased)")
        let disk = try #require(sim.secondary?.replicaDisk)
        #expect(disk.writes > 10, "replica disk writes: \(disk.writes)")
        #expect(disk.bytes.contains { $0 != 0 })
        #expect(sim.result().violations.isEmpty, "\(sim.result().violations)")
    }

    /// S3 for disks: a byte of the replica disk changes without a commit.
    @Test func s3CatchesAReplicaDiskThatDriftsFromEveryCapture() throws {
        let sim = try protectedPair()
        let disk = try #require(sim.secondary?.replicaDisk)
        disk.bytes[3 * 4096 + 100] ^= 1
        sim.run(forNanos: 100_000_000)
        #expect(sim.result().violations.contains { $0.promise == .s3 && $0.message.contains("disk") }, "\(sim.result().violations)")
    }

    /// S3 at the takeover: the resumed guest's disk must hold the write its memory records last.
    /// The primary dies; the replica disk then loses that block behind the replica's back.
    @Test func s3CatchesAResumedDiskThatDisagreesWithItsMemory() throws {
        let sim = try protectedPair()
        sim.inject(.crashPrimary(.beforeCapture))
        sim.run(forNanos: 60_000_000)
        #expect(!sim.primaryIsAlive)
        let replica = try #require(sim.secondary?.replica)
        let disk = try #require(sim.secondary?.replicaDisk)
        let block = Int(replica.memory.loadU64(at: SimulatedGuest.lastDiskBlockAddress))
        #expect(replica.memory.loadU64(at: SimulatedGuest.lastDiskCounterAddress) > 0)
        for i in block * 4096..<(block + 1) * 4096 { disk.bytes[i] = 0 }
        sim.run(forNanos: 1_000_000_000)
        #expect(sim.isTakenOver)
        #expect(sim.result().violations.contains { $0.promise == .s3 && $0.message.contains("disagrees with its memory") }, "\(sim.result().violations)")
    }

    /// S2 for frames: a NIC frame released by an ack before any committed checkpoint holds it.
    @Test func s2CatchesAFrameReleasedBeforeItsCheckpointCommitted() throws {
        let sim = try protectedPair()
        let p = try #require(sim.primary)
        var next = p.guest.guest.outputSequence + 1
        if next % 2 == 1 { next += 1 }
        let packet = OutputPacket(sequence: next, counter: p.guest.guest.counter + 1, seed: sim.config.seed).encoded()
        let output = WorldOutput(world: sim, resumed: false)
        output.host = p
        output.deliver([.frame(SimulatedNICFrame.wrap(packet, seed: sim.config.seed))], releasedThrough: Epoch(1), generation: Generation(1))
        #expect(sim.result().violations.contains { $0.promise == .s2 && $0.message.contains("#\(next)") }, "\(sim.result().violations)")
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

