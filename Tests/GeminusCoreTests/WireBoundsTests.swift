import Testing
@testable import GeminusCore

/// Review finding M2: numbers from the wire are checked before arithmetic, so a hostile or
/// broken primary gets its epoch refused, never a trap in the secondary.
@Suite struct WireBoundsTests {
    @Test func aDiskWriteEndingPastUInt64MaxIsRefusedNotATrap() throws {
        for write in [DiskWrite(offset: UInt64.max, data: [1]), DiskWrite.zeroes(offset: UInt64.max, length: 1),
                      DiskWrite(offset: UInt64.max - 10, data: [UInt8](repeating: 2, count: 4096))] {
            let disk = DiskReplicaTests.MemoryDisk(size: 1 << 20)
            let p = try Pipeline(disk: disk)
            #expect(try p.deliver(DiskReplicaTests().fullFrames(p, writes: [])).map(\.isCommitted) == true)
            let before = disk.bytes
            let outcome = try p.deliver(DiskReplicaTests().framesWith(p, writes: [write]))
            guard case .rejected = outcome else {
                Issue.record("a disk write at offset \(write.offset) was not refused: \(String(describing: outcome))")
                continue
            }
            #expect(disk.bytes == before)
            #expect(p.replica.committedEpoch == Epoch(1))
        }
    }

    @Test func anEpochPastTheBoundIsABadRecordSoTakeoverCanCountOnFromIt() throws {
        let p = try Pipeline()
        p.epoch = Epoch(UInt64.max - 1)  // the next epoch sent is UInt64.max
        let outcome = try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        #expect(outcome?.rejectReason == .badRecord, "\(String(describing: outcome))")
        #expect(p.replica.committedEpoch == .none)

        // The bound itself is still a valid epoch: the rule refuses only the absurd.
        let q = try Pipeline()
        q.epoch = Epoch(Epoch.maxAccepted.rawValue - 1)
        #expect(try q.deliver(q.nextEpochFrames(steps: 0, full: true))?.isCommitted == true)
        #expect(q.replica.committedEpoch.next == Epoch(Epoch.maxAccepted.rawValue + 1))
    }

    @Test func boundsLeaveRoomForNext() {
        #expect(Generation.maxAccepted.isAcceptable && !Generation(Generation.maxAccepted.rawValue + 1).isAcceptable)
        #expect(!Generation(UInt64.max).isAcceptable && !Epoch(UInt64.max).isAcceptable)
        #expect(Generation.maxAccepted.next.rawValue > Generation.maxAccepted.rawValue)
        #expect(GuestPage.maxCount * UInt64(GuestPage.size) / UInt64(GuestPage.size) == GuestPage.maxCount)
    }
}
