import Testing
import GeminusCore
@testable import GeminusReplication

private let ms: UInt64 = 1_000_000

/// Liveness beyond heartbeats (issue 18; review findings H1, M3, M5, M6): what the machines do
/// when the link is alive but the other side is not doing its part.
@Suite struct LivenessTests {
    /// Feeds `.captured` for every capture asked for, as the node does.
    static func run(_ m: inout PrimaryMachine, _ e: PrimaryMachine.Event, now: UInt64) -> [PrimaryMachine.Action] {
        var out: [PrimaryMachine.Action] = []
        var pending = m.handle(e)
        while !pending.isEmpty {
            let a = pending.removeFirst()
            out.append(a)
            if case .capture(let epoch, _) = a { pending += m.handle(.captured(epoch, nowNanos: now)) }
        }
        return out
    }

    static func protectedPrimary() -> PrimaryMachine {
        var m = PrimaryMachine(config: .init(epochIntervalNanos: 25 * ms, maxEpochsInFlight: 4, peerSilenceNanos: 150 * ms,
                                             unprotectAfterNanos: 300 * ms), generation: Generation(1))
        _ = run(&m, .peerConnected(nowNanos: 0), now: 0)
        _ = run(&m, .acknowledged(Epoch(1), Generation(1), nowNanos: 2 * ms), now: 2 * ms)
        return m
    }

    // MARK: - M3: the acknowledgement deadline

    /// A secondary whose apply loop hangs while its link thread sends heartbeats: before, the
    /// primary stayed PROTECTED with 4 epochs in flight for ever and held its output for ever.
    @Test func aSecondaryThatHeartbeatsButNeverAcknowledgesIsLost() throws {
        var m = Self.protectedPrimary()
        #expect(m.protection == .protected)
        #expect(m.config.ackTimeoutNanos == m.config.finalAckTimeoutNanos, "the bound is the switchover's final-ack bound")
        var lostAt: UInt64?
        var actions: [PrimaryMachine.Action] = []
        for t in stride(from: UInt64(5), through: 4000, by: 5) {
            let now = t * ms
            _ = Self.run(&m, .heardFromPeer(nowNanos: now), now: now)
            let a = Self.run(&m, .tick(nowNanos: now), now: now)
            if a.contains(where: { if case .disconnect = $0 { return true } else { return false } }) {
                lostAt = now
                actions = a
                break
            }
        }
        let at = try #require(lostAt, "the primary never gave up on a secondary that acknowledges nothing")
        #expect(m.epochsInFlight == 4)
        // The first epoch after the last ack went out at 25 ms: lost a little over 2 s later.
        #expect(at > 2_000 * ms && at <= 2_100 * ms)
        #expect(actions.contains { if case .notice(.peerLost) = $0 { return true } else { return false } })
        #expect(m.protection == .peerLost(sinceNanos: at))
        // Then the usual rules: no witness here, so unprotected after the hold time.
        let later = Self.run(&m, .tick(nowNanos: at + 300 * ms), now: at + 300 * ms)
        #expect(later.first == .releaseAllOutput)
        #expect(m.protection == .unprotected)
    }

    /// Acknowledgements that keep coming, however late each one is relative to its capture,
    /// keep the secondary: the deadline runs from the last progress.
    @Test func aSlowButProgressingSecondaryIsKept() {
        var m = Self.protectedPrimary()
        var acked = Epoch(1)
        for t in stride(from: UInt64(5), through: 10_000, by: 5) {
            let now = t * ms
            _ = Self.run(&m, .heardFromPeer(nowNanos: now), now: now)
            // One ack a second: the window is full most of the time.
            if t % 1000 == 0, m.lastTransmitted > acked {
                acked = acked.next
                _ = Self.run(&m, .acknowledged(acked, Generation(1), nowNanos: now), now: now)
            }
            let a = Self.run(&m, .tick(nowNanos: now), now: now)
            #expect(!a.contains { if case .disconnect = $0 { return true } else { return false } }, "lost at \(t) ms")
        }
        #expect(m.protection == .protected)
    }

    /// A full copy gets the longer bound (it carries the whole guest), but not for ever.
    @Test func anUnacknowledgedFullCopyIsLostAfterItsOwnBound() {
        var m = PrimaryMachine(config: .init(), generation: Generation(1))
        _ = Self.run(&m, .peerConnected(nowNanos: 0), now: 0)
        #expect(m.protection == .syncing(fullEpoch: Epoch(1)))
        let bound = m.config.fullCopyAckTimeoutNanos
        _ = Self.run(&m, .heardFromPeer(nowNanos: bound), now: bound)
        #expect(!Self.run(&m, .tick(nowNanos: bound), now: bound).contains { if case .disconnect = $0 { return true } else { return false } })
        _ = Self.run(&m, .heardFromPeer(nowNanos: bound + ms), now: bound + ms)
        #expect(Self.run(&m, .tick(nowNanos: bound + ms), now: bound + ms).contains { if case .disconnect = $0 { return true } else { return false } })
    }

    // MARK: - H1: a restarted primary

    /// The secondary holds epoch 10 of generation 1 from an earlier run of the primary's agent;
    /// the restarted agent starts at epoch 1. The secondary's stale nack names epoch 10: the
    /// primary numbers on after it, and the full checkpoint 11 makes it PROTECTED again.
    @Test func aStaleNackMakesARestartedPrimaryNumberOnAfterTheSecondary() {
        var m = PrimaryMachine(config: .init(epochIntervalNanos: 25 * ms), generation: Generation(1))
        #expect(Self.run(&m, .peerConnected(nowNanos: 0), now: 0) == [.capture(Epoch(1), full: true), .transmit(Epoch(1), base: .none)])
        let a = Self.run(&m, .refused(Epoch(10), .stale, nowNanos: 1 * ms), now: 1 * ms)
        #expect(a == [.notice(.continuesAfter(Epoch(10))), .capture(Epoch(11), full: true), .transmit(Epoch(11), base: Epoch(10))])
        #expect(m.protection == .syncing(fullEpoch: Epoch(11)))
        // The other stale nacks of the same restart name the same epoch: nothing more happens.
        #expect(Self.run(&m, .refused(Epoch(10), .stale, nowNanos: 2 * ms), now: 2 * ms).isEmpty)
        let ack = Self.run(&m, .acknowledged(Epoch(11), Generation(1), nowNanos: 3 * ms), now: 3 * ms)
        #expect(ack == [.releaseOutput(through: Epoch(11)), .notice(.protectionEstablished(Epoch(11)))])
        #expect(m.protection == .protected)
    }

    /// A stale nack that names an epoch this primary sent itself is the echo of a duplicated
    /// frame: no resync.
    @Test func aStaleNackForAnEpochSentHereChangesNothing() {
        var m = Self.protectedPrimary()
        _ = Self.run(&m, .tick(nowNanos: 25 * ms), now: 25 * ms)
        #expect(Self.run(&m, .refused(Epoch(1), .stale, nowNanos: 26 * ms), now: 26 * ms).isEmpty)
        #expect(Self.run(&m, .refused(Epoch(2), .stale, nowNanos: 26 * ms), now: 26 * ms).isEmpty)
        #expect(m.protection == .protected)
    }

    // MARK: - Secondary: M5, M3 (standby down), M6

    static func followingSecondary(arbitration: Arbitration = .none) -> SecondaryMachine {
        var m = SecondaryMachine(config: .init(takeoverAfterNanos: 150 * ms, arbitration: arbitration), generation: Generation(1))
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.committed(Epoch(1), nowNanos: 1 * ms))
        _ = m.handle(.committed(Epoch(2), nowNanos: 2 * ms))
        return m
    }

    static func cannotTakeOverReasons(_ actions: [SecondaryMachine.Action]) -> [String] {
        actions.compactMap { if case .notice(.cannotTakeOver(let r)) = $0 { return r } else { return nil } }
    }

    /// M5: the replica disk failed at a commit, then the primary went silent. Before, the machine
    /// took over from checkpoint 2 (whose disk is part-way to epoch 3) and the node found no
    /// resumable replica: status "took-over" and no guest. Now it says why it cannot.
    @Test func aReplicaDiskFailureThenPrimaryLossIsReportedNotAWedge() {
        var m = Self.followingSecondary()
        #expect(m.handle(.rejected(Epoch(3), .diskFailure, detail: "EIO", nowNanos: 3 * ms)) == [.refuse(Epoch(3), .diskFailure)])
        _ = m.handle(.primaryDisconnected(nowNanos: 10 * ms, reason: "EOF"))
        let a = m.handle(.tick(nowNanos: 200 * ms))
        let reasons = Self.cannotTakeOverReasons(a)
        #expect(reasons.count == 1)
        #expect(reasons.first?.contains("writing the replica disk failed at epoch 3 (EIO)") == true)
        #expect(!a.contains { if case .takeOver = $0 { return true } else { return false } })
        #expect(m.state == .primarySilent(sinceNanos: 2 * ms))
        #expect(m.handle(.tick(nowNanos: 300 * ms)).isEmpty, "said once")
    }

    /// ... and the full checkpoint that follows a disk failure makes the replica whole again.
    @Test func aFullCommitAfterADiskFailureMakesTheReplicaResumableAgain() {
        var m = Self.followingSecondary()
        _ = m.handle(.rejected(Epoch(3), .diskFailure, nowNanos: 3 * ms))
        _ = m.handle(.committed(Epoch(4), nowNanos: 4 * ms))
        _ = m.handle(.primaryDisconnected(nowNanos: 10 * ms, reason: "EOF"))
        #expect(m.handle(.tick(nowNanos: 200 * ms)) == [.takeOver(from: Epoch(4), generation: Generation(2))])
    }

    /// M3: a standby that is DOWN could not take over: the secondary lets the primary go (so it
    /// reports itself unprotected by its usual rules instead of PROTECTED), and its own silence
    /// afterwards is no reason to take over.
    @Test func aDownStandbyLetsThePrimaryGoAndNeverTakesOver() {
        var m = Self.followingSecondary()
        let down = m.handle(.standbyHealth(down: "DOWN (the standby QEMU does not answer)", nowNanos: 5 * ms))
        #expect(down.first == .notice(.standbyDown(reason: "DOWN (the standby QEMU does not answer)")))
        #expect(down.contains { if case .dropLink = $0 { return true } else { return false } })
        #expect(m.handle(.standbyHealth(down: "DOWN (the standby QEMU does not answer)", nowNanos: 6 * ms)).isEmpty, "said once")
        _ = m.handle(.primaryDisconnected(nowNanos: 6 * ms, reason: "dropped"))
        for t in stride(from: UInt64(10), through: 2000, by: 10) {
            let a = m.handle(.tick(nowNanos: t * ms))
            #expect(!a.contains { if case .takeOver = $0 { return true } else { return false } })
        }
        #expect(m.handle(.standbyHealth(down: nil, nowNanos: 2001 * ms)) == [.notice(.standbyBack)])
        // The primary ran unprotected meanwhile: checkpoint 2 is behind its released output.
        let after = m.handle(.tick(nowNanos: 2100 * ms))
        #expect(!after.contains { if case .takeOver = $0 { return true } else { return false } })
    }

    /// M6: the primary stopped its guest for good and said so: the secondary takes over at once,
    /// without waiting out the silence (a long --takeover-after-millis would keep the VM down).
    @Test func aPrimaryThatSaysItStoppedIsTakenOverAtOnce() {
        var m = SecondaryMachine(config: .init(takeoverAfterNanos: 60_000 * ms), generation: Generation(1))
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.committed(Epoch(1), nowNanos: 1 * ms))
        // A stop at an epoch never committed here is no stop this node can act on.
        #expect(m.handle(.primaryStopped(Epoch(2), reason: "forged", nowNanos: 4 * ms)).isEmpty)
        let a = m.handle(.primaryStopped(Epoch(1), reason: "the agent was asked to stop", nowNanos: 5 * ms))
        #expect(a.contains(.dropLink(reason: "the primary stopped")))
        #expect(a.last == .takeOver(from: Epoch(1), generation: Generation(2)))
    }

    /// With a witness the frame alone moves nothing: the primary's stop notice (the witness's
    /// record of it) is needed as well, as after a self-fence.
    @Test func withAWitnessTheStopNeedsTheWitnessRecordToo() {
        let timings = ArbitrationTimings(staleQuorumNanos: 100 * ms, selfFenceNanos: 50 * ms)
        var m = Self.followingSecondary(arbitration: .witness(timings))
        _ = m.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 3 * ms))
        let a = m.handle(.primaryStopped(Epoch(2), reason: "SIGTERM", nowNanos: 5 * ms))
        #expect(!a.contains { if case .takeOver = $0 { return true } else { return false } })
        let b = m.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true, stoppedGeneration: Generation(1)),
                                  nowNanos: 6 * ms))
        #expect(b == [.takeOver(from: Epoch(2), generation: Generation(2))])
    }
}

extension LivenessTests {
    /// The renumbered full copy is taken as this connection's first copy would have been: live
    /// when the secondary said it holds no resumable checkpoint (the guest is never paused for a
    /// whole copy of its RAM), paused when it holds one (kept whole until the new one commits).
    @Test(arguments: [false, true])
    func theRenumberedCopyIsLiveOnlyWhenNothingResumableIsHeld(peerHoldsCheckpoint: Bool) {
        var m = PrimaryMachine(config: .init(liveFirstCopy: true), generation: Generation(1))
        let first = m.handle(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: peerHoldsCheckpoint))
        // The secondary's nack comes while the first copy of the old numbering is being taken.
        #expect(m.handle(.refused(Epoch(10), .stale, nowNanos: 1 * ms)) == [.notice(.continuesAfter(Epoch(10)))])
        var next: [PrimaryMachine.Action] = []
        switch first.first {
        case .copyLive(let e, _)?: next = m.handle(.liveCopied(e, pages: 1, nowNanos: 1 * ms))
        case .capture(let e, _)?: next = m.handle(.captured(e, nowNanos: 1 * ms))
        default: Issue.record("no first copy: \(first)")
        }
        next += m.handle(.tick(nowNanos: 2 * ms))
        #expect(next.first == (peerHoldsCheckpoint ? .capture(Epoch(11), full: true) : .copyLive(Epoch(11), full: true)))
    }
}

extension LivenessTests {
    /// A full copy of a large guest takes a while to send: its acknowledgement deadline runs from
    /// the moment its last frame is queued, not from the capture, or a copy that takes longer to
    /// send than the bound would be called off every time and never finish.
    @Test func theDeadlineOfASlowSendRunsFromItsEnd() {
        var m = PrimaryMachine(config: .init(), generation: Generation(1))
        #expect(Self.run(&m, .peerConnected(nowNanos: 0), now: 0) == [.capture(Epoch(1), full: true), .transmit(Epoch(1), base: .none)])
        let sent = 50_000 * ms
        _ = m.handle(.transmitted(Epoch(1), nowNanos: sent))
        let bound = m.config.fullCopyAckTimeoutNanos
        for now in [sent + bound - ms, sent + bound + ms] {
            _ = m.handle(.heardFromPeer(nowNanos: now))
            let a = m.handle(.tick(nowNanos: now))
            let lost = a.contains { if case .disconnect = $0 { return true } else { return false } }
            #expect(lost == (now > sent + bound), "at \(now / ms) ms: \(a)")
        }
    }
}
