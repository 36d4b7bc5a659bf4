import Testing
import GeminusCore
@testable import GeminusReplication

private let ms: UInt64 = 1_000_000
private let witnessed = Arbitration.witness(ArbitrationTimings(staleQuorumNanos: 200 * ms, selfFenceNanos: 40 * ms))

/// Issue 18: no single frame moves the VM. Under a witness a planned handover needs the
/// primary's stop notice in the witness view as well as the `handover` frame.
@Suite struct HandoverWitnessTests {
    /// A secondary following generation 1 under a witness, with checkpoint 3 committed and the
    /// witness heard (quorate, the primary present, no stop notice).
    func following() -> SecondaryMachine {
        var s = SecondaryMachine(config: .init(takeoverAfterNanos: 100 * ms, arbitration: witnessed, handoverRecordWaitNanos: 500 * ms),
                                 generation: Generation(1))
        _ = s.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = s.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 0))
        _ = s.handle(.committed(Epoch(3), nowNanos: 1 * ms))
        return s
    }

    func stopNotice(_ g: UInt64) -> WitnessView {
        WitnessView(quorate: true, peerPresent: true, witnessHeard: true, stoppedGeneration: Generation(g))
    }

    @Test func aHandoverFrameWithoutTheStopNoticeResumesNothingAndIsDeclinedAfterTheBound() {
        var s = following()
        #expect(s.handle(.handoverRequested(Epoch(3), nowNanos: 10 * ms)).isEmpty)
        // The primary (or what posed as it) keeps the link alive meanwhile.
        _ = s.handle(.heardFromPrimary(nowNanos: 400 * ms))
        #expect(s.handle(.tick(nowNanos: 400 * ms)).isEmpty)
        _ = s.handle(.heardFromPrimary(nowNanos: 511 * ms))
        let answer = s.handle(.tick(nowNanos: 511 * ms))
        guard case .declineHandover(let e, let reason)? = answer.first, answer.count == 1 else {
            Issue.record("expected one decline, got \(answer)")
            return
        }
        #expect(e == Epoch(3))
        #expect(reason.contains("no stop notice of generation 1"))
        #expect(reason.contains("the arbitration's record as well as the frame"))
        #expect(s.state == .following)
        #expect(s.generation == Generation(1))
        // A notice that comes after the decline no longer moves the VM while the primary follows.
        #expect(s.handle(.witness(stopNotice(1), nowNanos: 520 * ms)).isEmpty)
        #expect(s.state == .following)
    }

    @Test func theHandoverIsAcceptedWhenTheStopNoticeArrives() {
        var s = following()
        #expect(s.handle(.handoverRequested(Epoch(3), nowNanos: 10 * ms)).isEmpty)
        #expect(s.handle(.witness(stopNotice(1), nowNanos: 12 * ms)) == [.acceptHandover(from: Epoch(3), generation: Generation(2))])
        #expect(s.state == .tookOver(from: Epoch(3), generation: Generation(2)))
    }

    @Test func aStopNoticeAlreadyInTheViewAcceptsAtOnce() {
        var s = following()
        _ = s.handle(.witness(stopNotice(1), nowNanos: 5 * ms))
        #expect(s.handle(.handoverRequested(Epoch(3), nowNanos: 10 * ms)) == [.acceptHandover(from: Epoch(3), generation: Generation(2))])
    }

    /// A stop notice of another generation, or heard while not quorate, is not this primary's.
    @Test func onlyTheStopNoticeOfThisGenerationInAQuorateViewCounts() {
        var s = following()
        _ = s.handle(.handoverRequested(Epoch(3), nowNanos: 10 * ms))
        #expect(s.handle(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true, stoppedGeneration: Generation(0)), nowNanos: 11 * ms)).isEmpty)
        #expect(s.handle(.witness(WitnessView(quorate: false, peerPresent: true, stoppedGeneration: Generation(1)), nowNanos: 12 * ms)).isEmpty)
        guard case .declineHandover? = s.handle(.tick(nowNanos: 600 * ms)).first else {
            Issue.record("expected a decline after the bound")
            return
        }
    }

    /// A checkpoint committed while the handover waits: the guest did not stay paused.
    @Test func aCommitWhileWaitingDeclines() {
        var s = following()
        _ = s.handle(.handoverRequested(Epoch(3), nowNanos: 10 * ms))
        _ = s.handle(.committed(Epoch(4), nowNanos: 20 * ms))
        guard case .declineHandover(Epoch(3), _)? = s.handle(.witness(stopNotice(1), nowNanos: 21 * ms)).first else {
            Issue.record("expected a decline of the handover at 3")
            return
        }
        #expect(s.state == .following)
    }

    /// Without arbitration the sealed frame alone moves the VM, as before.
    @Test func withoutArbitrationTheFrameAloneHandsOver() {
        var s = SecondaryMachine(config: .init(takeoverAfterNanos: 100 * ms), generation: Generation(1))
        _ = s.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = s.handle(.committed(Epoch(3), nowNanos: 1 * ms))
        #expect(s.handle(.handoverRequested(Epoch(3), nowNanos: 10 * ms)) == [.acceptHandover(from: Epoch(3), generation: Generation(2))])
    }

    /// The primary's side: under a witness its stop notice went out before the frame and is
    /// final, so a decline stops its guest for good instead of resuming it.
    @Test func aDeclinedPrimaryUnderAWitnessStaysStopped() {
        var m = PrimaryMachine(config: .init(epochIntervalNanos: 25 * ms, maxEpochsInFlight: 3, peerSilenceNanos: 100 * ms,
                                             unprotectAfterNanos: 200 * ms, finalAckTimeoutNanos: 500 * ms,
                                             takeoverConfirmTimeoutNanos: 1000 * ms, arbitration: witnessed),
                               generation: Generation(1))
        func run(_ e: PrimaryMachine.Event) -> [PrimaryMachine.Action] {
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
        _ = run(.witness(WitnessView(quorate: true, peerPresent: true, witnessHeard: true), nowNanos: 0))
        _ = run(.peerConnected(nowNanos: 0))
        _ = run(.acknowledged(Epoch(1), Generation(1), nowNanos: 1 * ms))
        #expect(m.protection == .protected)
        _ = run(.switchoverRequested(nowNanos: 30 * ms))
        guard case .awaitingFinalAck(let final, _)? = m.switchover else {
            Issue.record("no final capture: \(String(describing: m.switchover))")
            return
        }
        #expect(run(.acknowledged(final, Generation(1), nowNanos: 31 * ms)).contains(.handOver(final)))
        let a = run(.handoverDeclined(reason: "no stop notice", nowNanos: 40 * ms))
        #expect(!a.contains(.resumeGuest))
        #expect(a == [.notice(.handoverDeclinedAfterStopNotice(final, reason: "no stop notice")), .finishHandover(final, confirmedGeneration: nil)])
        #expect(m.switchover == .handedOver(final, confirmedGeneration: nil))
    }
}
