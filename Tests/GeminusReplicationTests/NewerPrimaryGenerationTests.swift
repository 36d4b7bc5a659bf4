import Testing
import GeminusCore
@testable import GeminusReplication

private let ms: UInt64 = 1_000_000
private let timings = ArbitrationTimings(staleQuorumNanos: 200 * ms, selfFenceNanos: 40 * ms)

/// A restarted primary agent takes the next generation (`GenerationFile.startGeneration`). Until
/// its first checkpoint commits, the secondary still holds the older generation's checkpoint,
/// and the witness's record must be read against that one.
@Suite struct NewerPrimaryGenerationTests {
    @Test func aRecordOfTheCheckpointsGenerationStillForbidsItAfterANewerPrimaryConnects() {
        var s = SecondaryMachine(config: .init(takeoverAfterNanos: 100 * ms, arbitration: .witness(timings)), generation: Generation(1))
        _ = s.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = s.handle(.committed(Epoch(50), nowNanos: 1 * ms))
        // The agent dies; its guest runs on, unprotected under the witness's record after 60.
        _ = s.handle(.primaryDisconnected(nowNanos: 2 * ms, reason: "EOF"))
        // The restarted agent connects as generation 2 and is lost before anything commits.
        _ = s.handle(.primaryConnected(Generation(2), nowNanos: 10 * ms))
        #expect(s.committedGeneration == Generation(1))
        _ = s.handle(.primaryDisconnected(nowNanos: 20 * ms, reason: "EOF"))
        let won = WitnessView(quorate: true, peerPresent: false, witnessHeard: true,
                              record: WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(60)))
        var actions = s.handle(.witness(won, nowNanos: 200 * ms))
        actions += s.handle(.tick(nowNanos: 500 * ms))
        #expect(!actions.contains { if case .takeOver = $0 { return true } else { return false } }, "\(actions)")
        #expect(actions.contains { if case .notice(.cannotTakeOver) = $0 { return true } else { return false } }, "\(actions)")
    }

    /// Once the newer primary's checkpoint commits, the older record no longer concerns it.
    @Test func aCheckpointOfTheNewerGenerationIsJudgedAsItsOwn() {
        var s = SecondaryMachine(config: .init(takeoverAfterNanos: 100 * ms, arbitration: .witness(timings)), generation: Generation(1))
        _ = s.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = s.handle(.committed(Epoch(50), nowNanos: 1 * ms))
        _ = s.handle(.primaryDisconnected(nowNanos: 2 * ms, reason: "EOF"))
        _ = s.handle(.primaryConnected(Generation(2), nowNanos: 10 * ms))
        _ = s.handle(.committed(Epoch(51), nowNanos: 11 * ms))
        #expect(s.committedGeneration == Generation(2))
        _ = s.handle(.primaryDisconnected(nowNanos: 20 * ms, reason: "EOF"))
        let won = WitnessView(quorate: true, peerPresent: false, witnessHeard: true,
                              record: WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(60)))
        var actions = s.handle(.witness(won, nowNanos: 200 * ms))
        actions += s.handle(.tick(nowNanos: 500 * ms))
        #expect(actions.contains(.takeOver(from: Epoch(51), generation: Generation(3))), "\(actions)")
    }
}
