import Testing
import GeminusCore
@testable import GeminusReplication

private let ms: UInt64 = 1_000_000

@Suite struct PrimaryMachineTests {
    var m = PrimaryMachine(config: .init(epochIntervalNanos: 25 * ms, maxEpochsInFlight: 3, peerSilenceNanos: 100 * ms, unprotectAfterNanos: 200 * ms),
                           generation: Generation(1))

    /// Feeds `.captured` for every capture asked for, as the agent does.
    mutating func run(_ e: PrimaryMachine.Event, now: UInt64) -> [PrimaryMachine.Action] {
        var out: [PrimaryMachine.Action] = []
        var pending = m.handle(e)
        while !pending.isEmpty {
            let a = pending.removeFirst()
            out.append(a)
            if case .capture(let epoch, _) = a { pending += m.handle(.captured(epoch, nowNanos: now)) }
        }
        return out
    }

    @Test mutating func unprotectedUntilASecondaryConnects() {
        #expect(run(.tick(nowNanos: 0), now: 0).isEmpty)
        #expect(m.protection == .unprotected)
        let a = run(.peerConnected(nowNanos: 10), now: 10)
        #expect(a == [.capture(Epoch(1), full: true), .transmit(Epoch(1), base: .none)])
        #expect(m.protection == .syncing(fullEpoch: Epoch(1)))
        let ack = run(.acknowledged(Epoch(1), Generation(1), nowNanos: 20), now: 20)
        #expect(ack == [.releaseOutput(through: Epoch(1)), .notice(.protectionEstablished(Epoch(1)))])
        #expect(m.protection == .protected)
    }

    @Test mutating func epochsFollowTheIntervalAndDeltasChainOnTheLastSent() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        #expect(run(.tick(nowNanos: 10 * ms), now: 10 * ms).isEmpty)
        #expect(run(.tick(nowNanos: 25 * ms), now: 25 * ms) == [.capture(Epoch(2), full: false), .transmit(Epoch(2), base: Epoch(1))])
        #expect(run(.tick(nowNanos: 50 * ms), now: 50 * ms) == [.capture(Epoch(3), full: false), .transmit(Epoch(3), base: Epoch(2))])
    }

    /// A slow secondary delays checkpoints (counted); it never makes the primary skip one.
    @Test mutating func inFlightLimitDefersEpochs() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        _ = run(.heardFromPeer(nowNanos: 60 * ms), now: 60 * ms)
        _ = run(.tick(nowNanos: 25 * ms), now: 25 * ms)
        _ = run(.tick(nowNanos: 50 * ms), now: 50 * ms)
        #expect(m.epochsInFlight == 3)
        #expect(run(.tick(nowNanos: 75 * ms), now: 75 * ms) == [.notice(.epochDeferred(inFlight: 3))])
        // Still waiting on the next ticks: the same epoch, not counted again.
        #expect(run(.tick(nowNanos: 76 * ms), now: 76 * ms).isEmpty)
        #expect(run(.tick(nowNanos: 77 * ms), now: 77 * ms).isEmpty)
        #expect(m.deferredEpochs == 1)
        let a = run(.acknowledged(Epoch(2), Generation(1), nowNanos: 80 * ms), now: 80 * ms)
        #expect(a.first == .releaseOutput(through: Epoch(2)))
        #expect(run(.tick(nowNanos: 81 * ms), now: 81 * ms).first == .capture(Epoch(4), full: false))
    }

    /// S2: output is released through an epoch only after that epoch's ack.
    @Test mutating func releaseFollowsAcksOnly() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        _ = run(.tick(nowNanos: 25 * ms), now: 25 * ms)
        var all: [PrimaryMachine.Action] = []
        all += run(.tick(nowNanos: 50 * ms), now: 50 * ms)
        all += run(.heardFromPeer(nowNanos: 50 * ms), now: 50 * ms)
        #expect(!all.contains { if case .releaseOutput = $0 { return true }; return false })
        #expect(run(.acknowledged(Epoch(2), Generation(1), nowNanos: 51 * ms), now: 51 * ms).first == .releaseOutput(through: Epoch(2)))
        // Old or duplicate acks release nothing more.
        #expect(run(.acknowledged(Epoch(1), Generation(1), nowNanos: 52 * ms), now: 52 * ms).isEmpty)
    }

    @Test mutating func ackFromAnotherGenerationIsRefused() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        #expect(run(.acknowledged(Epoch(1), Generation(0), nowNanos: 1), now: 1) == [.notice(.staleAck(Epoch(1), Generation(0)))])
        #expect(m.lastAcknowledged == .none)
        #expect(m.staleAcks == 1)
    }

    @Test mutating func ackForAnEpochNeverSentDropsTheLink() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        let a = run(.acknowledged(Epoch(9), Generation(1), nowNanos: 1), now: 1)
        #expect(a.contains { if case .disconnect = $0 { return true }; return false })
        #expect(m.lastAcknowledged == .none)
    }

    @Test mutating func nackTriggersOneFullResync() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        _ = run(.acknowledged(Epoch(1), Generation(1), nowNanos: 1), now: 1)
        _ = run(.tick(nowNanos: 25 * ms), now: 25 * ms)
        _ = run(.heardFromPeer(nowNanos: 26 * ms), now: 26 * ms)
        let a = run(.refused(Epoch(2), .digestMismatch, nowNanos: 30 * ms), now: 30 * ms)
        #expect(a.first == .notice(.resyncing(after: Epoch(2), .digestMismatch)))
        #expect(m.protection == .syncing(fullEpoch: Epoch(3)))
        let next = run(.tick(nowNanos: 50 * ms), now: 50 * ms)
        #expect(next.first == .capture(Epoch(3), full: true))
        // An echo of the same failure does not start another resync.
        #expect(run(.refused(Epoch(2), .baseMismatch, nowNanos: 51 * ms), now: 51 * ms).isEmpty)
    }

    @Test mutating func silentSecondaryIsLostThenTheVMIsDeclaredUnprotected() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        let lost = run(.tick(nowNanos: 101 * ms), now: 101 * ms)
        #expect(lost.first == .disconnect(reason: "secondary silent for 101 ms"))
        #expect(m.protection == .peerLost(sinceNanos: 101 * ms))
        // Held output stays held while the secondary might still be taking over.
        #expect(run(.tick(nowNanos: 250 * ms), now: 250 * ms).isEmpty)
        let a = run(.tick(nowNanos: 301 * ms), now: 301 * ms)
        #expect(a.first == .releaseAllOutput)
        #expect(m.protection == .unprotected)
        // No checkpoints while nobody listens.
        #expect(run(.tick(nowNanos: 400 * ms), now: 400 * ms).isEmpty)
    }

    @Test mutating func reconnectStartsWithAFullCheckpointAndKeepsNumbering() {
        _ = run(.peerConnected(nowNanos: 0), now: 0)
        _ = run(.tick(nowNanos: 25 * ms), now: 25 * ms)
        _ = run(.peerDisconnected(nowNanos: 30 * ms, reason: "reset"), now: 30 * ms)
        let a = run(.peerConnected(nowNanos: 40 * ms), now: 40 * ms)
        #expect(a.first == .capture(Epoch(3), full: true))
        #expect(run(.acknowledged(Epoch(3), Generation(1), nowNanos: 41 * ms), now: 41 * ms).last == .notice(.protectionEstablished(Epoch(3))))
    }

    @Test func aDeltaCapturedAcrossAReconnectIsNotSent() {
        var m = PrimaryMachine(config: .init(), generation: Generation(1))
        _ = m.handle(.peerConnected(nowNanos: 0))       // asks for full 1
        _ = m.handle(.captured(Epoch(1), nowNanos: 0))
        _ = m.handle(.tick(nowNanos: 25 * ms))           // asks for delta 2
        _ = m.handle(.peerConnected(nowNanos: 26 * ms))  // new link while 2 is being captured
        let a = m.handle(.captured(Epoch(2), nowNanos: 27 * ms))
        #expect(!a.contains { if case .transmit = $0 { return true }; return false })
        #expect(a.first == .capture(Epoch(3), full: true))
    }

    @Test func takenOverVMContinuesNumbering() {
        var m = PrimaryMachine(config: .init(), generation: Generation(2), resumedFrom: Epoch(40))
        let a = m.handle(.peerConnected(nowNanos: 0))
        #expect(a == [.capture(Epoch(41), full: true)])
    }
}
