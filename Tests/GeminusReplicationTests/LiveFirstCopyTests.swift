import Testing
import GeminusCore
@testable import GeminusReplication

private let ms: UInt64 = 1_000_000

/// The live first copy as the machine runs it: rounds while the guest runs, then one pause
/// whose epoch is the first whole checkpoint. Protection, and any release of held output,
/// wait for that epoch's acknowledgement; a live round's acknowledgement only moves the window.
@Suite struct LiveFirstCopyTests {
    var m = PrimaryMachine(config: .init(epochIntervalNanos: 25 * ms, maxEpochsInFlight: 8, peerSilenceNanos: 100 * ms,
                                         unprotectAfterNanos: 200 * ms, liveFirstCopy: true, liveRoundsMax: 4, liveStopPages: 100),
                           generation: Generation(1))

    /// Feeds `.captured` and `.liveCopied` (with the page counts given, round by round) as the node does.
    mutating func run(_ e: PrimaryMachine.Event, now: UInt64, pages: [Int] = []) -> [PrimaryMachine.Action] {
        var pages = pages[...]
        var out: [PrimaryMachine.Action] = []
        var pending = m.handle(e)
        while !pending.isEmpty {
            let a = pending.removeFirst()
            out.append(a)
            switch a {
            case .capture(let epoch, _): pending += m.handle(.captured(epoch, nowNanos: now))
            case .copyLive(let epoch, _): pending += m.handle(.liveCopied(epoch, pages: pages.popFirst() ?? 0, nowNanos: now))
            default: break
            }
        }
        return out
    }

    @Test mutating func roundsUntilOneIsSmallThenOnePauseThatIsTheFirstCheckpoint() {
        let a = run(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false), now: 0, pages: [4096, 900, 80])
        #expect(a == [.copyLive(Epoch(1), full: true), .transmit(Epoch(1), base: .none),
                      .copyLive(Epoch(2), full: false), .transmit(Epoch(2), base: Epoch(1)),
                      .copyLive(Epoch(3), full: false), .transmit(Epoch(3), base: Epoch(2)),
                      // 80 pages <= 100: the pause copies the rest.
                      .capture(Epoch(4), full: false), .transmit(Epoch(4), base: Epoch(3))])
        #expect(m.protection == .syncing(fullEpoch: Epoch(4)))
        // A live round's acknowledgement is no checkpoint: nothing protected yet.
        let early = run(.acknowledged(Epoch(3), Generation(1), nowNanos: 5 * ms), now: 5 * ms)
        #expect(!early.contains(.notice(.protectionEstablished(Epoch(3)))))
        #expect(m.protection == .syncing(fullEpoch: Epoch(4)))
        let done = run(.acknowledged(Epoch(4), Generation(1), nowNanos: 6 * ms), now: 6 * ms)
        #expect(done == [.releaseOutput(through: Epoch(4)), .notice(.protectionEstablished(Epoch(4)))])
        #expect(m.protection == .protected)
    }

    @Test mutating func roundsStopWhenTheyStopShrinkingOrAtTheLimit() {
        // The second round is no smaller than the first delta: pause.
        var a = run(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false), now: 0, pages: [4096, 900, 950])
        #expect(a.last == .transmit(Epoch(4), base: Epoch(3)))
        #expect(a.filter { if case .copyLive = $0 { return true }; return false }.count == 3)
        // At the limit of rounds: pause whatever is left.
        m = PrimaryMachine(config: .init(liveFirstCopy: true, liveRoundsMax: 2, liveStopPages: 1), generation: Generation(1))
        a = run(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false), now: 0, pages: [4096, 3000])
        #expect(a == [.copyLive(Epoch(1), full: true), .transmit(Epoch(1), base: .none),
                      .copyLive(Epoch(2), full: false), .transmit(Epoch(2), base: Epoch(1)),
                      .capture(Epoch(3), full: false), .transmit(Epoch(3), base: Epoch(2))])
    }

    /// A secondary that holds a checkpoint keeps it whole: its copy is paused (a live round
    /// would overwrite it with pages that may be torn before the new checkpoint commits).
    @Test mutating func aSecondaryWithACheckpointGetsAPausedCopy() {
        let a = run(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: true), now: 0)
        #expect(a == [.capture(Epoch(1), full: true), .transmit(Epoch(1), base: .none)])
    }

    /// A nack during steady state resynchronises with a paused full copy: the secondary may
    /// still hold its last checkpoint.
    @Test mutating func aResyncAfterANackIsPaused() {
        _ = run(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false), now: 0, pages: [4096, 10])
        _ = run(.acknowledged(Epoch(3), Generation(1), nowNanos: 1 * ms), now: 1 * ms)
        #expect(m.protection == .protected)
        let a = run(.refused(Epoch(3), .digestMismatch, nowNanos: 30 * ms), now: 30 * ms)
        #expect(a.contains(.capture(Epoch(4), full: true)))
        #expect(!a.contains { if case .copyLive = $0 { return true }; return false })
    }

    /// The link lost in the middle of the live copy: the next connection starts it again.
    @Test mutating func aLostLinkEndsTheLiveCopy() {
        var pending = m.handle(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false))
        #expect(pending == [.copyLive(Epoch(1), full: true)])
        _ = m.handle(.peerDisconnected(nowNanos: 1 * ms, reason: "test"))
        #expect(m.liveCopy == nil)
        // The round in progress finishes into nothing.
        #expect(m.handle(.liveCopied(Epoch(1), pages: 4096, nowNanos: 2 * ms)).isEmpty)
        pending = run(.peerConnected(nowNanos: 3 * ms, peerHoldsCheckpoint: false), now: 3 * ms, pages: [4096, 10])
        #expect(pending.first == .copyLive(Epoch(2), full: true))
    }

    /// A disk still streaming keeps the rounds going past the limit and past a small round;
    /// they follow at the epoch cadence (not at once), and the pause comes only after a round
    /// that found the disk caught up.
    @Test mutating func aDeviceStillCopyingKeepsTheRoundsGoing() {
        var pending = m.handle(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false))
        var now: UInt64 = 0
        var actions: [PrimaryMachine.Action] = []
        // Rounds 1...6 (the limit is 4) with the disk still copying, then one caught up.
        for round in 1...7 {
            guard case .copyLive(let epoch, let full)? = pending.first else {
                Issue.record("round \(round): expected a live round, got \(pending)")
                return
            }
            #expect(full == (round == 1))
            pending = m.handle(.liveCopied(epoch, pages: 10, devicesPending: round < 7, nowNanos: now))
            actions += pending
            // Acknowledge live rounds so the window never closes (and the peer is heard).
            _ = m.handle(.heardFromPeer(nowNanos: now))
            _ = m.handle(.acknowledged(epoch, Generation(1), nowNanos: now))
            if round < 7 {
                // Not at once: the next round is due an epoch interval later.
                #expect(pending == [.transmit(epoch, base: epoch.rawValue == 1 ? .none : Epoch(epoch.rawValue - 1))], "round \(round): \(pending)")
                now += 25 * ms
                pending = m.handle(.tick(nowNanos: now))
            }
        }
        // The round that found the disk caught up is followed by the pause at once.
        #expect(actions.suffix(2) == [.transmit(Epoch(7), base: Epoch(6)), .capture(Epoch(8), full: false)])
    }

    /// A guest whose disk can only be copied live is copied live even when the secondary holds
    /// a checkpoint, and after a nack.
    @Test mutating func aDiskThatMustStreamIsAlwaysCopiedLive() {
        var config = PrimaryMachine.Config(liveFirstCopy: true, liveRoundsMax: 4, liveStopPages: 100)
        config.fullCopyMustBeLive = true
        m = PrimaryMachine(config: config, generation: Generation(1))
        var a = run(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: true), now: 0, pages: [4096, 10])
        #expect(a.first == .copyLive(Epoch(1), full: true))
        _ = run(.acknowledged(Epoch(3), Generation(1), nowNanos: 1 * ms), now: 1 * ms)
        #expect(m.protection == .protected)
        a = run(.refused(Epoch(3), .digestMismatch, nowNanos: 30 * ms), now: 30 * ms, pages: [4096, 10])
        #expect(a.contains(.copyLive(Epoch(4), full: true)), "\(a)")
        #expect(!a.contains(.capture(Epoch(4), full: true)))
    }

    /// While the live copy runs nothing is held, so the secondary's silence is tolerated up to
    /// the longer live-copy bound; once the pause's checkpoint is in flight the usual bound holds.
    @Test mutating func silenceDuringTheLiveCopyIsToleratedLongerThanAfterIt() {
        var config = PrimaryMachine.Config(epochIntervalNanos: 25 * ms, peerSilenceNanos: 100 * ms, liveFirstCopy: true,
                                           liveRoundsMax: 4, liveStopPages: 100)
        config.liveCopySilenceNanos = 1_000 * ms
        m = PrimaryMachine(config: config, generation: Generation(1))
        var pending = m.handle(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false))
        #expect(pending == [.copyLive(Epoch(1), full: true)])
        pending = m.handle(.liveCopied(Epoch(1), pages: 4096, devicesPending: true, nowNanos: 0))
        // 500 ms of silence in the middle of the copy: not lost.
        pending = m.handle(.tick(nowNanos: 500 * ms))
        #expect(!pending.contains { if case .disconnect = $0 { return true }; return false }, "\(pending)")
        #expect(m.protection != .peerLost(sinceNanos: 500 * ms))
        // Past the live-copy bound: lost.
        m = PrimaryMachine(config: config, generation: Generation(1))
        _ = m.handle(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false))
        _ = m.handle(.liveCopied(Epoch(1), pages: 4096, devicesPending: true, nowNanos: 0))
        pending = m.handle(.tick(nowNanos: 1_100 * ms))
        #expect(pending.contains { if case .disconnect = $0 { return true }; return false }, "\(pending)")
        // After the pause that ends the copy, the usual 100 ms.
        m = PrimaryMachine(config: config, generation: Generation(1))
        _ = run(.peerConnected(nowNanos: 0, peerHoldsCheckpoint: false), now: 0, pages: [4096, 10])
        #expect(m.liveCopy == nil)
        pending = m.handle(.tick(nowNanos: 150 * ms))
        #expect(pending.contains { if case .disconnect = $0 { return true }; return false }, "\(pending)")
    }
}
