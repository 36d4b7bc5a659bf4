import Testing
@testable import GeminusCore

@Suite struct OutputQueueTests {
    /// S2: an item leaves only when the epoch that produced it is acknowledged.
    @Test func itemsLeaveOnlyThroughTheirAcknowledgedEpoch() {
        var q = OutputQueue<Int>(limitBytes: 1000, mode: .holding, openEpoch: Epoch(1))
        #expect(q.append(1, bytes: 10) == .held)
        #expect(q.append(2, bytes: 10) == .held)
        q.open(epoch: Epoch(2))
        #expect(q.append(3, bytes: 10) == .held)
        q.open(epoch: Epoch(3))
        #expect(q.append(4, bytes: 10) == .held)
        #expect(q.release(through: Epoch(0)) == [])
        #expect(q.release(through: Epoch(1)) == [1, 2])
        #expect(q.release(through: Epoch(1)) == [])
        #expect(q.heldCount == 2)
        #expect(q.release(through: Epoch(3)) == [3, 4])
        #expect(q.heldBytes == 0)
    }

    @Test func fullQueueRefusesAndCountsNeverDrops() {
        var q = OutputQueue<Int>(limitBytes: 25, mode: .holding)
        #expect(q.append(1, bytes: 10) == .held)
        #expect(q.append(2, bytes: 10) == .held)
        #expect(q.append(3, bytes: 10) == .full)
        #expect(q.append(3, bytes: 10) == .full)
        #expect(q.fullRefusals == 2)
        #expect(q.heldCount == 2)
        #expect(q.release(through: Epoch(1)) == [1, 2])
        #expect(q.append(3, bytes: 10) == .held)
    }

    /// A self-fenced primary: what was held is dropped, and nothing is taken or released after,
    /// whichever mode its caller asks for.
    @Test func aFencedQueueDropsWhatItHeldAndReleasesNothingEver() {
        var q = OutputQueue<Int>(limitBytes: 100, mode: .holding)
        #expect(q.append(1, bytes: 10) == .held)
        #expect(q.append(2, bytes: 10) == .held)
        #expect(q.fence() == 2)
        #expect(q.isFenced && q.heldCount == 0 && q.heldBytes == 0)
        #expect(q.append(3, bytes: 10) == .full)
        #expect(q.fullRefusals == 0, "a fence is not a full buffer")
        #expect(q.release(through: Epoch(9)) == [])
        #expect(q.setMode(.passThrough) == [])
        #expect(q.append(4, bytes: 10) == .full, "no pass-through after a fence")
    }

    @Test func anOversizedItemCannotWedgeAnEmptyQueue() {
        var q = OutputQueue<Int>(limitBytes: 5, mode: .holding)
        #expect(q.append(1, bytes: 50) == .held)
        #expect(q.append(2, bytes: 1) == .full)
    }

    @Test func passThroughReleasesAtOnceAndLeavingHoldingFlushesInOrder() {
        var q = OutputQueue<Int>(limitBytes: 100, mode: .passThrough)
        #expect(q.append(1, bytes: 1) == .releaseNow)
        #expect(q.setMode(.holding) == [])
        #expect(q.append(2, bytes: 1) == .held)
        q.open(epoch: Epoch(2))
        #expect(q.append(3, bytes: 1) == .held)
        #expect(q.setMode(.passThrough) == [2, 3])
        #expect(q.heldCount == 0)
    }

    @Test func releaseOrderIsProductionOrderOverManyEpochs() {
        var q = OutputQueue<Int>(limitBytes: 1 << 20, mode: .holding)
        var produced: [Int] = []
        var released: [Int] = []
        var n = 0
        for e in 1...200 {
            if e > 1 { q.open(epoch: Epoch(UInt64(e))) }
            for _ in 0..<(e % 7) { n += 1; produced.append(n); _ = q.append(n, bytes: 8) }
            if e % 3 == 0 { released += q.release(through: Epoch(UInt64(e - 1))) }
        }
        released += q.release(through: Epoch(200))
        #expect(released == produced)
    }
}

@Suite struct LogThrottleTests {
    @Test func repeatsAreCountedAndLoggedOncePerInterval() {
        var t = LogThrottle(intervalNanos: 1_000)
        #expect(t.admit("refused: wrong size", nowNanos: 0) == 0)
        #expect(t.admit("refused: wrong size", nowNanos: 10) == nil)
        #expect(t.admit("refused: wrong size", nowNanos: 20) == nil)
        #expect(t.admit("refused: wrong size", nowNanos: 1_000) == 2)
        // A different message is news: logged at once.
        #expect(t.admit("refused: bad key", nowNanos: 1_001) == 0)
        #expect(t.admit("refused: wrong size", nowNanos: 1_002) == 0)
    }
}
