import Testing
import GeminusCore
@testable import GeminusReplication

private let ms: UInt64 = 1_000_000

@Suite struct SecondaryMachineTests {
    func machine() -> SecondaryMachine { SecondaryMachine(config: .init(takeoverAfterNanos: 100 * ms), generation: Generation(1)) }

    @Test func acknowledgesEachCommitAndRefusesRejections() {
        var m = machine()
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        #expect(m.handle(.committed(Epoch(1), nowNanos: 1)) == [.acknowledge(Epoch(1))])
        #expect(m.state == .following)
        #expect(m.handle(.rejected(Epoch(2), .digestMismatch, nowNanos: 2)) == [.refuse(Epoch(2), .digestMismatch)])
    }

    /// L1: the takeover happens once the silence bound has passed, not before, and at most once.
    @Test func takesOverAfterTheSilenceBoundFromTheLastCommit() {
        var m = machine()
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.committed(Epoch(1), nowNanos: 10 * ms))
        _ = m.handle(.committed(Epoch(2), nowNanos: 20 * ms))
        let lost = m.handle(.primaryDisconnected(nowNanos: 30 * ms, reason: "EOF"))
        #expect(lost == [.notice(.primaryLost(reason: "EOF"))])
        #expect(m.handle(.tick(nowNanos: 119 * ms)).isEmpty)
        #expect(m.handle(.tick(nowNanos: 120 * ms)) == [.takeOver(from: Epoch(2), generation: Generation(2))])
        #expect(m.generation == Generation(2))
        #expect(m.handle(.tick(nowNanos: 500 * ms)).isEmpty)
        #expect(m.handle(.committed(Epoch(3), nowNanos: 501 * ms)).isEmpty)
    }

    @Test func heartbeatsKeepASilentButConnectedPrimaryAlive() {
        var m = machine()
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.committed(Epoch(1), nowNanos: 0))
        for t in stride(from: 10, through: 1000, by: 10) {
            _ = m.handle(.heardFromPrimary(nowNanos: UInt64(t) * ms))
            #expect(m.handle(.tick(nowNanos: UInt64(t) * ms + 5 * ms)).isEmpty)
        }
    }

    @Test func silenceOnAnOpenLinkDropsItThenTakesOver() {
        var m = machine()
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.committed(Epoch(1), nowNanos: 0))
        let a = m.handle(.tick(nowNanos: 101 * ms))
        #expect(a.first == .dropLink(reason: "primary silent for 101 ms"))
        #expect(a.last == .takeOver(from: Epoch(1), generation: Generation(2)))
    }

    @Test func aPrimaryThatReturnsInTimeCancelsTheTakeover() {
        var m = machine()
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.committed(Epoch(1), nowNanos: 0))
        _ = m.handle(.primaryDisconnected(nowNanos: 10 * ms, reason: "reset"))
        #expect(m.handle(.primaryConnected(Generation(1), nowNanos: 50 * ms)) == [.notice(.primaryBack)])
        #expect(m.handle(.tick(nowNanos: 120 * ms)).isEmpty)
        #expect(m.state == .following)
    }

    /// A reconnected primary may have run unprotected and released output past the old
    /// checkpoint: until the new connection commits, the old one is not resumed (simulator
    /// seed 1337).
    @Test func aCheckpointFromBeforeAReconnectionIsNotResumed() {
        var m = machine()
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.committed(Epoch(5), nowNanos: 0))
        _ = m.handle(.primaryDisconnected(nowNanos: 10 * ms, reason: "reset"))
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 500 * ms))
        _ = m.handle(.primaryDisconnected(nowNanos: 510 * ms, reason: "EOF"))
        let a = m.handle(.tick(nowNanos: 700 * ms))
        guard case .notice(.cannotTakeOver) = a.first, a.count == 1 else { Issue.record("expected cannotTakeOver, got \(a)"); return }
        #expect(m.handle(.tick(nowNanos: 800 * ms)).isEmpty)
        // Each loss is reported, not only the first (simulator seed 114).
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 810 * ms))
        _ = m.handle(.primaryDisconnected(nowNanos: 820 * ms, reason: "EOF"))
        guard case .notice(.cannotTakeOver)? = m.handle(.tick(nowNanos: 1000 * ms)).first else { Issue.record("the second loss was not reported"); return }
        // Once the new connection commits, that checkpoint is resumed as usual.
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 1100 * ms))
        _ = m.handle(.committed(Epoch(9), nowNanos: 1110 * ms))
        _ = m.handle(.primaryDisconnected(nowNanos: 1120 * ms, reason: "EOF"))
        #expect(m.handle(.tick(nowNanos: 1300 * ms)) == [.takeOver(from: Epoch(9), generation: Generation(2))])
    }

    @Test func nothingToResumeBeforeTheFirstCommit() {
        var m = machine()
        _ = m.handle(.primaryConnected(Generation(1), nowNanos: 0))
        _ = m.handle(.primaryDisconnected(nowNanos: 5 * ms, reason: "EOF"))
        let a = m.handle(.tick(nowNanos: 200 * ms))
        #expect(a.count == 1)
        guard case .notice(.cannotTakeOver) = a.first else { Issue.record("expected cannotTakeOver, got \(a)"); return }
        #expect(m.handle(.tick(nowNanos: 300 * ms)).isEmpty)
    }
}
