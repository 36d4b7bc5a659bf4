import Testing
import GeminusCore
@testable import GeminusReplication

private let ms: UInt64 = 1_000_000

/// Planned switchover: the guest is paused for good only after the final checkpoint is
/// acknowledged, and runs here again only on an explicit refusal.
@Suite struct SwitchoverTests {
    var m = PrimaryMachine(config: .init(epochIntervalNanos: 25 * ms, maxEpochsInFlight: 3, peerSilenceNanos: 100 * ms,
                                         unprotectAfterNanos: 200 * ms, finalAckTimeoutNanos: 500 * ms,
                                         takeoverConfirmTimeoutNanos: 1000 * ms),
                           generation: Generation(1))

    /// Feeds `.captured` for every capture asked for, as the agent does.
    mutating func run(_ e: PrimaryMachine.Event) -> [PrimaryMachine.Action] {
        var out: [PrimaryMachine.Action] = []
        var pending = m.handle(e)
        while !pending.isEmpty {
            let a = pending.removeFirst()
            out.append(a)
            switch a {
            case .capture(let epoch, _), .captureFinal(let epoch): pending += m.handle(.captured(epoch, nowNanos: 0))
            default: break
            }
        }
        return out
    }

    /// Connected, full checkpoint 1 acknowledged, epoch 2 sent and not yet acknowledged.
    mutating func protectedWithOneInFlight() {
        _ = run(.peerConnected(nowNanos: 0))
        _ = run(.acknowledged(Epoch(1), Generation(1), nowNanos: 1 * ms))
        _ = run(.heardFromPeer(nowNanos: 25 * ms))
        _ = run(.tick(nowNanos: 25 * ms))
        #expect(m.protection == .protected)
        #expect(m.lastTransmitted == Epoch(2))
    }

    @Test mutating func handsOverOnlyAfterTheFinalAckThenStops() {
        protectedWithOneInFlight()
        let start = run(.switchoverRequested(nowNanos: 30 * ms))
        #expect(start == [.captureFinal(Epoch(3)), .transmit(Epoch(3), base: Epoch(2))])
        // No further epochs while paused, and the ack of an earlier epoch does not hand over.
        #expect(run(.tick(nowNanos: 60 * ms)).isEmpty)
        #expect(run(.acknowledged(Epoch(2), Generation(1), nowNanos: 61 * ms)) == [.releaseOutput(through: Epoch(2))])
        #expect(run(.acknowledged(Epoch(3), Generation(1), nowNanos: 62 * ms)) == [.releaseOutput(through: Epoch(3)), .handOver(Epoch(3))])
        #expect(run(.handoverConfirmed(Generation(2), nowNanos: 70 * ms)) == [.finishHandover(Epoch(3), confirmedGeneration: Generation(2))])
        #expect(m.switchover == .handedOver(Epoch(3), confirmedGeneration: Generation(2)))
        // Nothing moves afterwards: not a capture, not an unprotected release.
        #expect(run(.tick(nowNanos: 10_000 * ms)).isEmpty)
        #expect(run(.peerDisconnected(nowNanos: 10_001 * ms, reason: "EOF")).isEmpty)
    }

    @Test mutating func refusedUnlessProtected() {
        #expect(run(.switchoverRequested(nowNanos: 0)) == [.notice(.switchoverRefused(reason: "no secondary protects this VM"))])
        _ = run(.peerConnected(nowNanos: 0))
        guard case .notice(.switchoverRefused) = run(.switchoverRequested(nowNanos: 1)).first else {
            Issue.record("a switchover during the full copy must be refused")
            return
        }
        #expect(m.switchover == nil)
    }

    @Test mutating func declinedResumesTheGuestAndCarriesOn() {
        protectedWithOneInFlight()
        _ = run(.switchoverRequested(nowNanos: 30 * ms))
        _ = run(.acknowledged(Epoch(3), Generation(1), nowNanos: 31 * ms))
        let a = run(.handoverDeclined(reason: "no", nowNanos: 40 * ms))
        #expect(a.prefix(2) == [.resumeGuest, .notice(.switchoverAborted(reason: "the secondary declined: no"))])
        #expect(a.last == .transmit(Epoch(4), base: Epoch(3)))
        #expect(m.switchover == nil)
    }

    @Test mutating func finalAckTimeoutResumesTheGuest() {
        protectedWithOneInFlight()
        _ = run(.switchoverRequested(nowNanos: 30 * ms))
        _ = run(.heardFromPeer(nowNanos: 500 * ms))
        #expect(run(.tick(nowNanos: 530 * ms)).isEmpty)
        _ = run(.heardFromPeer(nowNanos: 531 * ms))
        let a = run(.tick(nowNanos: 531 * ms))
        #expect(a.first == .resumeGuest)
        #expect(m.switchover == nil)
    }

    /// The link goes after the handover was sent: the secondary may be running the guest,
    /// so it never runs here again (S1), though the outcome is unconfirmed.
    @Test mutating func linkLossAfterHandoverNeverResumesHere() {
        protectedWithOneInFlight()
        _ = run(.switchoverRequested(nowNanos: 30 * ms))
        _ = run(.acknowledged(Epoch(3), Generation(1), nowNanos: 31 * ms))
        let a = run(.peerDisconnected(nowNanos: 40 * ms, reason: "EOF"))
        #expect(a.contains(.finishHandover(Epoch(3), confirmedGeneration: nil)))
        #expect(!a.contains(.resumeGuest))
        #expect(!a.contains(.releaseAllOutput))
    }

    /// Lost before the final ack: not handed over; the guest runs on as after any link loss.
    @Test mutating func linkLossBeforeTheFinalAckResumesHere() {
        protectedWithOneInFlight()
        _ = run(.switchoverRequested(nowNanos: 30 * ms))
        let a = run(.peerDisconnected(nowNanos: 40 * ms, reason: "EOF"))
        #expect(a.contains(.resumeGuest))
        #expect(m.switchover == nil)
        #expect(m.protection == .peerLost(sinceNanos: 40 * ms))
    }

    @Test func secondaryTakesOverOnlyAtItsCommittedEpoch() {
        var s = SecondaryMachine(config: .init(takeoverAfterNanos: 100 * ms), generation: Generation(1))
        _ = s.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = s.handle(.committed(Epoch(1), nowNanos: 1))
        #expect(s.handle(.handoverRequested(Epoch(2), nowNanos: 2))
                == [.declineHandover(Epoch(2), reason: "the secondary's last committed checkpoint is 1, not 2")])
        #expect(s.handle(.handoverRequested(Epoch(1), nowNanos: 3)) == [.acceptHandover(from: Epoch(1), generation: Generation(2))])
        #expect(s.state == .tookOver(from: Epoch(1), generation: Generation(2)))
    }
}
