import Testing
@testable import GeminusCore
import GeminusHypervisor

/// Replicated disks in the checkpoint stream (promise S2 for disks): an epoch's disk writes
/// reach the replica disk only when the whole epoch verified and committed; a torn or refused
/// epoch leaves the disk as it was; a full epoch replaces the whole disk.
@Suite struct DiskReplicaTests {
    final class MemoryDisk: ReplicaDisk {
        var bytes: [UInt8]
        var writes = 0
        init(size: Int) { bytes = [UInt8](repeating: 0xEE, count: size) }  // not zero: a full epoch must clear it
        var sizeBytes: UInt64 { UInt64(bytes.count) }
        func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
            writes += 1
            bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
        }
        func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
            writes += 1
            bytes.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
        }
        func zeroAll() throws(GeminusError) { bytes = [UInt8](repeating: 0, count: bytes.count) }
        func sync() throws(GeminusError) {}
    }

    static func block(_ seed: UInt8, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: Int(seed) &* 31 &+ $0) } }

    @Test func writesLandOnlyAtTheirEpochsCommitAndAFullEpochReplacesTheDisk() throws {
        let disk = MemoryDisk(size: 1 << 20)
        let p = try Pipeline(disk: disk)
        // Full: memory plus two stretches of the disk; the rest must read as zero afterwards.
        var frames = try fullFrames(p, writes: [])
        #expect(try p.deliver(frames)?.isCommitted == true)  // a full epoch with no writes: the whole disk is zero
        #expect(disk.bytes.allSatisfy { $0 == 0 }, "a full epoch of an all-zero disk left old bytes")

        // A delta with writes, one of them larger than a frame (split into records), delivered
        // without its end record: the disk is untouched.
        let big = Self.block(3, 200_000)
        frames = try framesWith(p, writes: [DiskWrite(offset: 4096, data: Self.block(1, 512)), DiskWrite(offset: 300_000, data: big)])
        #expect(frames.count > 4, "the 200 KB write should span several 64 KiB frames")
        let early = try p.deliver(Array(frames.dropLast()))
        #expect(early == .staged, "\(String(describing: early))")
        #expect(disk.bytes.allSatisfy { $0 == 0 }, "disk written before the epoch committed")
        let verdict1 = try p.deliver([frames.last!])
        #expect(verdict1?.isCommitted == true, "\(String(describing: verdict1))")
        #expect(Array(disk.bytes[4096..<4608]).elementsEqual(Self.block(1, 512)))
        #expect(disk.bytes[300_000..<500_000].elementsEqual(big))

        // A torn epoch (the link drops before its end): its writes never land.
        let torn = try framesWith(p, writes: [DiskWrite(offset: 0, data: Self.block(9, 4096))])
        #expect(try p.deliver(Array(torn.dropLast())) == .staged)
        _ = p.replica.abandonStaging(reason: .torn)
        #expect(disk.bytes[0..<4096].allSatisfy { $0 == 0 }, "a torn epoch's write reached the disk")
        #expect(p.replica.committedEpoch == Epoch(2))

        // Full again: the replica becomes exactly the primary's stretches, nothing older survives.
        frames = try fullFrames(p, writes: [DiskWrite(offset: 65536, data: Self.block(5, 65536))])
        #expect(try p.deliver(frames)?.isCommitted == true)
        #expect(disk.bytes[65536..<131072].elementsEqual(Self.block(5, 65536)))
        #expect(disk.bytes[0..<65536].allSatisfy { $0 == 0 } && disk.bytes[131072...].allSatisfy { $0 == 0 })
    }

    @Test func aStandbyWithoutADiskRefusesWritesAndWithOneRefusesAFullEpochWithout() throws {
        let noDisk = try Pipeline()
        guard case .rejected(_, .geometryMismatch, let why)? = try noDisk.deliver(fullFrames(noDisk, writes: [], diskSize: 1 << 20)) else {
            Issue.record("a primary with a disk was not refused by a standby without one")
            return
        }
        #expect(why.contains("has none"))

        let withDisk = try Pipeline(disk: MemoryDisk(size: 4096))
        guard case .rejected(_, .geometryMismatch, let why2)? = try withDisk.deliver(withDisk.nextEpochFrames(steps: 0, full: true)) else {
            Issue.record("a primary without a disk was not refused by a standby with one")
            return
        }
        #expect(why2.contains("none"))
        #expect(try withDisk.deliver(fullFrames(withDisk, writes: [], diskSize: 4096))?.isCommitted == true)
        // Beyond the disk's end.
        let beyond = try framesWith(withDisk, writes: [DiskWrite(offset: 4000, data: [UInt8](repeating: 1, count: 200))], diskSize: 4096)
        guard case .rejected(_, .geometryMismatch, _)? = try withDisk.deliver(beyond) else {
            Issue.record("a write beyond the replica disk was not refused")
            return
        }
    }

    @Test func zeroWritesCrossAsHeadersAndZeroTheDiskOnlyAtTheCommit() throws {
        let disk = MemoryDisk(size: 1 << 20)
        let p = try Pipeline(disk: disk)
        let filled = Self.block(7, 1 << 20)
        #expect(try p.deliver(fullFrames(p, writes: [DiskWrite(offset: 0, data: filled)]))?.isCommitted == true)
        #expect(disk.bytes == filled)

        // 600 KiB zeroed (longer than a 64 KiB frame: one record all the same), then data
        // inside the zeroed range: order matters.
        let zero = DiskWrite.zeroes(offset: 100_000, length: 600_000)
        #expect(zero.isZeroes && zero.length == 600_000 && zero.data.isEmpty)
        let after = DiskWrite(offset: 200_000, data: Self.block(8, 1000))
        let frames = try framesWith(p, writes: [zero, after])
        let diskFrameBytes = try frames.map { f -> Int in
            var d = FrameDecoder()
            d.feed(f)
            guard let frame = try d.next(), frame.header.kind == .diskWrites else { return 0 }
            return frame.payload.count
        }.reduce(0, +)
        #expect(diskFrameBytes == 2 * DiskWrite.headerSize + 1000, "a zero write must cross as a header alone")
        #expect(try p.deliver(Array(frames.dropLast())) == .staged)
        #expect(disk.bytes == filled, "zeroed before the epoch committed")
        guard case .committed(_, let stats)? = try p.deliver([frames.last!]) else {
            Issue.record("the epoch with a zero write did not commit")
            return
        }
        #expect(stats.diskBytes == 1000, "diskBytes counts data bytes only")
        var expected = filled
        expected.replaceSubrange(100_000..<700_000, with: repeatElement(0, count: 600_000))
        expected.replaceSubrange(200_000..<201_000, with: Self.block(8, 1000))
        #expect(disk.bytes == expected)

        // A zero write beyond the disk is refused like a data write.
        let beyond = try framesWith(p, writes: [.zeroes(offset: 4096, length: 1 << 20)])
        guard case .rejected(_, .geometryMismatch, _)? = try p.deliver(beyond) else {
            Issue.record("a zero write beyond the disk was not refused")
            return
        }
        #expect(disk.bytes == expected)
    }

    /// The digest covers the zero flag: the same record with the flag flipped (and a valid frame
    /// checksum) is refused, and the disk is untouched.
    @Test func flippingAZeroFlagIsADigestMismatch() throws {
        for original in [DiskWrite(offset: 8192, data: []), DiskWrite.zeroes(offset: 8192, length: 0)] {
            let disk = MemoryDisk(size: 1 << 20)
            let p = try Pipeline(disk: disk)
            #expect(try p.deliver(fullFrames(p, writes: [DiskWrite(offset: 0, data: Self.block(1, 65536))]))?.isCommitted == true)
            let before = disk.bytes
            var frames = try framesWith(p, writes: [original, .zeroes(offset: 0, length: 4096)])
            let i = try #require(frames.firstIndex { f in
                var d = FrameDecoder()
                d.feed(f)
                return (try? d.next())??.header.kind == .diskWrites
            })
            var d = FrameDecoder()
            d.feed(frames[i])
            let frame = try #require(try d.next())
            var payload = frame.payload
            payload[12] ^= UInt8(DiskWrite.zeroesFlag)  // the first record's flags
            frames[i] = FrameCodec.encode(frame.header, payload: payload)
            guard case .rejected(_, .digestMismatch, _)? = try p.deliver(frames) else {
                Issue.record("a flipped zero flag on \(original) was not a digest mismatch")
                continue
            }
            #expect(disk.bytes == before)
        }
    }

    /// A zero write longer than a u32 crosses as several records and lands whole, on a sparse
    /// 5 GiB FileReplicaDisk (the journaled path).
    @Test func aZeroWriteOverFourGiBIsSplitIntoRecords() throws {
        let dir = try TempDir()
        let size: UInt64 = 5 << 30
        let disk = try FileReplicaDisk(path: dir.path + "/big.img", sizeBytes: size)
        let p = try Pipeline(disk: disk)
        let tail = Self.block(4, 4096)
        let marks = [DiskWrite(offset: 4096, data: Self.block(2, 4096)), DiskWrite(offset: (4 << 30) + 8192, data: Self.block(3, 4096)),
                     DiskWrite(offset: size - 4096, data: tail)]
        #expect(try p.deliver(fullFrames(p, writes: marks, diskSize: size))?.isCommitted == true)
        #expect(try dir.read("big.img", at: (4 << 30) + 8192, count: 4096) == Self.block(3, 4096))
        let frames = try framesWith(p, writes: [.zeroes(offset: 0, length: size - 4096)], diskSize: size)
        var records = 0
        for f in frames {
            var d = FrameDecoder()
            d.feed(f)
            if let frame = try d.next(), frame.header.kind == .diskWrites { records += frame.payload.count / DiskWrite.headerSize }
        }
        #expect(records == 2)
        #expect(try p.deliver(frames)?.isCommitted == true)
        #expect(try dir.read("big.img", at: 4096, count: 4096).allSatisfy { $0 == 0 })
        #expect(try dir.read("big.img", at: (4 << 30) + 8192, count: 4096).allSatisfy { $0 == 0 })
        #expect(try dir.read("big.img", at: size - 4096, count: 4096) == tail)
    }

    /// A full epoch of `p` carrying `writes` as its disk.
    func fullFrames(_ p: Pipeline, writes: [DiskWrite], diskSize: UInt64 = 1 << 20) throws -> [[UInt8]] {
        try p.guest.capture(full: true, into: p.buffer)
        p.buffer.diskWrites = writes
        p.buffer.diskSizeBytes = diskSize
        p.epoch = p.epoch.next
        var frames: [[UInt8]] = []
        _ = p.encoder.encode(p.buffer, epoch: p.epoch, generation: p.generation, baseEpoch: .none) { frames.append($0) }
        p.lastSent = p.epoch
        return frames
    }

    /// The next delta epoch of `p` with `writes` added to its capture.
    func framesWith(_ p: Pipeline, writes: [DiskWrite], diskSize: UInt64 = 1 << 20) throws -> [[UInt8]] {
        _ = p.guest.step()
        try p.guest.capture(full: false, into: p.buffer)
        p.buffer.diskWrites = writes
        p.buffer.diskSizeBytes = diskSize
        p.epoch = p.epoch.next
        var frames: [[UInt8]] = []
        _ = p.encoder.encode(p.buffer, epoch: p.epoch, generation: p.generation, baseEpoch: p.lastSent) { frames.append($0) }
        p.lastSent = p.epoch
        return frames
    }
}
