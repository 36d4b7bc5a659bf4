import Testing
import GeminusCore
import GeminusReplication

/// The arbitration rules one by one: the primary's lease, its unprotect gate, the secondary's
/// takeover gate. The simulator checks them together under faults (SimulationSweepTests).
@Suite struct ArbitrationTests {
    static let timings = ArbitrationTimings(staleQuorumNanos: 1_000_000_000, selfFenceNanos: 200_000_000)
    static let ms: UInt64 = 1_000_000

    @Test func corosyncTimingsFollowTheTokenAndConsensus() {
        let t = ArbitrationTimings.corosync(tokenMillis: 300, consensusMillis: 360)
        #expect(t.staleQuorumNanos == 1_320 * Self.ms)
        #expect(t.selfFenceNanos == 200 * Self.ms)
        #expect(t.takeoverWaitNanos == 1_520 * Self.ms)
    }

    @Test func leaseFencesOnLostQuorumAndOnAFrozenWatchOnly() {
        var lease = PrimaryLease(timings: Self.timings)
        #expect(lease.handle(.view(WitnessView(quorate: true, peerPresent: false), nowNanos: 0)).isEmpty)
        #expect(lease.handle(.tick(nowNanos: 150 * Self.ms)).isEmpty)
        let fence = lease.handle(.view(WitnessView(quorate: false, peerPresent: false), nowNanos: 160 * Self.ms))
        #expect(fence.count == 1)
        #expect(lease.fenced)
        #expect(lease.handle(.view(WitnessView(quorate: true, peerPresent: true), nowNanos: 170 * Self.ms)).isEmpty, "a fence is for good")

        var frozen = PrimaryLease(timings: Self.timings)
        _ = frozen.handle(.view(WitnessView(quorate: true, peerPresent: true), nowNanos: 0))
        _ = frozen.handle(.tick(nowNanos: 10 * Self.ms))
        // Thawed 400 ms later: the quorate view it holds may predate a lost quorum.
        guard case .selfFence(let reason)? = frozen.handle(.tick(nowNanos: 410 * Self.ms)).first else {
            Issue.record("a watch that did not run for 400 ms must fence")
            return
        }
        #expect(reason.contains("400 ms"))
    }

    /// Corosync may go on calling a node quorate for seconds while it cannot form a membership
    /// (one-way loss, measured in Tools/ca-partition-test); its own messages stop at once.
    @Test func leaseFencesWhenTheRingDeliversNothingOfItsOwn() {
        let t = ArbitrationTimings.corosync(tokenMillis: 300, consensusMillis: 360)
        #expect(t.ringSilenceNanos == 1_320 * Self.ms)
        #expect(t.ringSilenceNanos + t.selfFenceNanos < (300 + 360) * Self.ms + t.takeoverWaitNanos,
                "the primary stops before the earliest takeover after its last token")
        var lease = PrimaryLease(timings: t, watchesRing: true)
        // A delivery from before the lease began (the node was a secondary) counts for nothing.
        #expect(lease.handle(.ownDelivery(atNanos: 0)).isEmpty)
        var now: UInt64 = 5_000 * Self.ms
        #expect(lease.handle(.view(WitnessView(quorate: true, peerPresent: true), nowNanos: now)).isEmpty)
        #expect(lease.handle(.tick(nowNanos: now)).isEmpty, "the first tick starts the count")
        // Deliveries every 100 ms, ticks every 10 ms: nothing.
        while now < 7_000 * Self.ms {
            now += 10 * Self.ms
            if now % (100 * Self.ms) == 0 { #expect(lease.handle(.ownDelivery(atNanos: now)).isEmpty) }
            #expect(lease.handle(.tick(nowNanos: now)).isEmpty)
        }
        // The ring breaks at 7 s; the view stays "quorate". A membership change's silence
        // (token + consensus) passes; past ringSilence it fences.
        while now < 7_000 * Self.ms + t.ringSilenceNanos {
            now += 10 * Self.ms
            #expect(lease.handle(.tick(nowNanos: now)).isEmpty, "at \(now / Self.ms) ms")
        }
        guard case .selfFence(let reason)? = lease.handle(.tick(nowNanos: now + 10 * Self.ms)).first else {
            Issue.record("a ring silent for longer than ringSilence must fence")
            return
        }
        #expect(reason.contains("delivered none"))
        // Without the watch (the simulator's default) silence alone never fences.
        var unwatched = PrimaryLease(timings: t)
        _ = unwatched.handle(.view(WitnessView(quorate: true, peerPresent: true), nowNanos: 0))
        for i in 1...500 { #expect(unwatched.handle(.tick(nowNanos: UInt64(i) * 10 * Self.ms)).isEmpty) }
    }

    /// A primary that holds the only copy that may run (took the VM over, or its unprotect is
    /// recorded) is not fenced: no one else may resume, so a fence would only destroy the VM.
    /// Arming (a secondary connects) fences at once if the view is bad by then.
    @Test func aSoleCopyIsNotFencedUntilArmed() {
        let t = ArbitrationTimings.corosync(tokenMillis: 300, consensusMillis: 360)
        var lease = PrimaryLease(timings: t, watchesRing: true)
        #expect(lease.handle(.soleCopy(true, nowNanos: 0)).isEmpty)
        #expect(lease.handle(.view(WitnessView(quorate: false, peerPresent: false), nowNanos: 10 * Self.ms)).isEmpty)
        #expect(lease.handle(.tick(nowNanos: 3_000 * Self.ms)).isEmpty, "ring silent, frozen watch: still nothing")
        #expect(lease.unhealthy(3_000 * Self.ms) != nil)
        #expect(!lease.fenced)
        // Armed while unhealthy: fenced at once (the agent turns the secondary away instead).
        var armedBad = lease
        #expect(armedBad.handle(.soleCopy(false, nowNanos: 3_010 * Self.ms)).count == 1)
        // Sound again, then armed: nothing; a lost quorum after that fences.
        _ = lease.handle(.ownDelivery(atNanos: 3_020 * Self.ms))
        _ = lease.handle(.view(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 3_020 * Self.ms))
        #expect(lease.unhealthy(3_030 * Self.ms) == nil)
        #expect(lease.handle(.soleCopy(false, nowNanos: 3_030 * Self.ms)).isEmpty)
        #expect(lease.handle(.view(WitnessView(quorate: false, peerPresent: true), nowNanos: 3_040 * Self.ms)).count == 1)
    }

    @Test func theMachineHoldsTheSoleCopyAfterATakeoverOrARecordedUnprotectOnly() {
        let fresh = PrimaryMachine(config: .init(arbitration: .witness(Self.timings)), generation: Generation(1))
        #expect(!fresh.soleCopy, "a fresh start: an earlier agent's secondary may hold this generation")
        var resumed = PrimaryMachine(config: .init(arbitration: .witness(Self.timings)), generation: Generation(2), resumedFrom: Epoch(40))
        #expect(resumed.soleCopy)
        _ = resumed.handle(.peerConnected(nowNanos: 0))
        #expect(!resumed.soleCopy, "the secondary will hold checkpoints from now on")
        var (p, lost) = lostPrimary(.witness(Self.timings))
        #expect(!p.soleCopy)
        _ = p.handle(.tick(nowNanos: lost + 300 * Self.ms))
        #expect(!p.soleCopy, "asked, not recorded")
        let mine = WitnessRecord(generation: Generation(3), unprotectedAfter: Epoch(1))
        _ = p.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true, record: mine), nowNanos: lost + 310 * Self.ms))
        #expect(p.protection == .unprotected && p.soleCopy)
    }

    func lostPrimary(_ arbitration: Arbitration) -> (PrimaryMachine, UInt64) {
        var p = PrimaryMachine(config: .init(peerSilenceNanos: 150 * Self.ms, unprotectAfterNanos: 300 * Self.ms, arbitration: arbitration),
                               generation: Generation(3))
        _ = p.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 0))
        _ = p.handle(.peerConnected(nowNanos: 0))
        _ = p.handle(.captured(Epoch(1), nowNanos: 1 * Self.ms))
        _ = p.handle(.acknowledged(Epoch(1), Generation(3), nowNanos: 2 * Self.ms))
        _ = p.handle(.peerDisconnected(nowNanos: 10 * Self.ms, reason: "test"))
        return (p, 10 * Self.ms)
    }

    @Test func primaryRunsUnprotectedOnlyOnceTheWitnessRecordedIt() {
        var (p, lost) = lostPrimary(.witness(Self.timings))
        let asked = p.handle(.tick(nowNanos: lost + 300 * Self.ms))
        #expect(asked == [.announceUnprotected(generation: Generation(3), after: Epoch(1))])
        #expect(p.handle(.tick(nowNanos: lost + 400 * Self.ms)).isEmpty, "asked once")
        // A view without the record (or an older generation's) releases nothing.
        let old = WitnessRecord(generation: Generation(2), unprotectedAfter: Epoch(9))
        #expect(p.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true, record: old), nowNanos: lost + 410 * Self.ms)).isEmpty)
        // Recorded, but this node lost quorum meanwhile: still held (the fence watch stops it).
        let mine = WitnessRecord(generation: Generation(3), unprotectedAfter: Epoch(1))
        #expect(p.handle(.witness(WitnessView(quorate: false, peerPresent: false, witnessHeard: true, record: mine), nowNanos: lost + 420 * Self.ms)).isEmpty)
        let released = p.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true, record: mine), nowNanos: lost + 430 * Self.ms))
        #expect(released.first == .releaseAllOutput)
        #expect(p.protection == .unprotected)
    }

    @Test func withoutArbitrationThePrimaryUnprotectsOnTime() {
        var (p, lost) = lostPrimary(.none)
        #expect(p.handle(.tick(nowNanos: lost + 300 * Self.ms)).first == .releaseAllOutput)
    }

    func followingSecondary(_ arbitration: Arbitration) -> SecondaryMachine {
        var s = SecondaryMachine(config: .init(takeoverAfterNanos: 150 * Self.ms, arbitration: arbitration), generation: Generation(3))
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 0))
        _ = s.handle(.primaryConnected(Generation(3), nowNanos: 0))
        _ = s.handle(.committed(Epoch(5), nowNanos: 1 * Self.ms))
        _ = s.handle(.primaryDisconnected(nowNanos: 10 * Self.ms, reason: "test"))
        return s
    }

    static func takesOver(_ a: [SecondaryMachine.Action]) -> Bool {
        a.contains { if case .takeOver = $0 { return true } else { return false } }
    }

    @Test func secondaryWaitsForTheWinAndTheWaitAndTheWitnessRecord() {
        var s = followingSecondary(.witness(Self.timings))
        // Silent long enough, but the primary's node is still in the cluster.
        #expect(!Self.takesOver(s.handle(.tick(nowNanos: 2_000 * Self.ms))))
        // Not quorate: the other side may hold the witness.
        #expect(!Self.takesOver(s.handle(.witness(WitnessView(quorate: false, peerPresent: false), nowNanos: 2_100 * Self.ms))))
        #expect(!Self.takesOver(s.handle(.tick(nowNanos: 5_000 * Self.ms))))
        // Won at 5.1 s: nothing before 5.1 s + the wait.
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true), nowNanos: 5_100 * Self.ms))
        #expect(!Self.takesOver(s.handle(.tick(nowNanos: 5_100 * Self.ms + Self.timings.takeoverWaitNanos - 1))))
        #expect(Self.takesOver(s.handle(.tick(nowNanos: 5_100 * Self.ms + Self.timings.takeoverWaitNanos))))
        #expect(s.generation == Generation(4))
    }

    @Test func aWinThatIsLostRestartsTheWait() {
        var s = followingSecondary(.witness(Self.timings))
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true), nowNanos: 1_000 * Self.ms))
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 1_500 * Self.ms))
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true), nowNanos: 2_000 * Self.ms))
        #expect(!Self.takesOver(s.handle(.tick(nowNanos: 1_000 * Self.ms + Self.timings.takeoverWaitNanos + Self.ms))))
        #expect(Self.takesOver(s.handle(.tick(nowNanos: 2_000 * Self.ms + Self.timings.takeoverWaitNanos))))
    }

    @Test func theWitnessRecordForbidsResumingACheckpointBehindReleasedOutput() {
        var s = followingSecondary(.witness(Self.timings))
        let record = WitnessRecord(generation: Generation(3), unprotectedAfter: Epoch(5))
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true, record: record), nowNanos: 1_000 * Self.ms))
        let actions = s.handle(.tick(nowNanos: 1_000 * Self.ms + Self.timings.takeoverWaitNanos))
        #expect(!Self.takesOver(actions))
        #expect(actions.contains { if case .notice(.cannotTakeOver(let why)) = $0 { return why.contains("witness recorded") } else { return false } })
        // A record of an older episode (before checkpoint 5) does not stand in the way.
        var t = followingSecondary(.witness(Self.timings))
        let older = WitnessRecord(generation: Generation(3), unprotectedAfter: Epoch(4))
        _ = t.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true, record: older), nowNanos: 1_000 * Self.ms))
        #expect(Self.takesOver(t.handle(.tick(nowNanos: 1_000 * Self.ms + Self.timings.takeoverWaitNanos))))
    }

    @Test func aWinWithoutTheWitnessHeardWaits() {
        var s = followingSecondary(.witness(Self.timings))
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: false), nowNanos: 1_000 * Self.ms))
        #expect(!Self.takesOver(s.handle(.tick(nowNanos: 9_000 * Self.ms))))
        #expect(Self.takesOver(s.handle(.witness(WitnessView(quorate: true, peerPresent: false, witnessHeard: true), nowNanos: 9_001 * Self.ms))))
    }

    /// A self-fenced primary whose node rejoined the cluster (its Corosync runs on) told the
    /// witness it stopped: its secondary takes over at once, though the node is present.
    @Test func aRecordedStopOfThisGenerationLetsTheSecondaryTakeOverWithThePeerPresent() {
        var s = followingSecondary(.witness(Self.timings))
        #expect(!Self.takesOver(s.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 1_000 * Self.ms))))
        // Another generation's stop says nothing about the primary this replica follows.
        let other = WitnessView(quorate: true, peerPresent: true, witnessHeard: true, stoppedGeneration: Generation(2))
        #expect(!Self.takesOver(s.handle(.witness(other, nowNanos: 1_100 * Self.ms))))
        #expect(!Self.takesOver(s.handle(.tick(nowNanos: 9_000 * Self.ms))))
        // Not quorate: the stop is not acted on (this node may be the one cut off).
        var stopped = WitnessView(quorate: false, peerPresent: true, witnessHeard: true, stoppedGeneration: Generation(3))
        #expect(!Self.takesOver(s.handle(.witness(stopped, nowNanos: 9_100 * Self.ms))))
        // The record still rules: a stop after running unprotected past checkpoint 5 is no licence.
        var behind = followingSecondary(.witness(Self.timings))
        let unprotected = WitnessRecord(generation: Generation(3), unprotectedAfter: Epoch(5))
        #expect(!Self.takesOver(behind.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true, record: unprotected,
                                                                   stoppedGeneration: Generation(3)), nowNanos: 1_000 * Self.ms))))
        // Quorate with the stopped primary's node, the witness unheard: the primary's own word
        // (its record merged in by the link) is enough.
        stopped.quorate = true
        stopped.witnessHeard = false
        #expect(Self.takesOver(s.handle(.witness(stopped, nowNanos: 9_300 * Self.ms))), "no wait: the primary said it stopped")
        #expect(s.generation == Generation(4))
    }

    @Test func recordsMergeToTheNewest() {
        let a = WitnessRecord(generation: Generation(2), unprotectedAfter: Epoch(50))
        let b = WitnessRecord(generation: Generation(3), unprotectedAfter: Epoch(1))
        let c = WitnessRecord(generation: Generation(3), unprotectedAfter: Epoch(7))
        #expect(a.merged(with: b) == b && b.merged(with: a) == b)
        #expect(b.merged(with: c) == c && c.merged(with: b) == c)
        #expect(!c.allowsResuming(Epoch(7), at: Generation(3)) && c.allowsResuming(Epoch(8), at: Generation(3)))
        #expect(!c.allowsResuming(Epoch(99), at: Generation(2)), "a newer generation ran: an older replica is never resumed")
    }
}
