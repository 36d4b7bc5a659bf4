import Testing
import Glibc
@testable import GeminusCore
import GeminusHypervisor

@Suite struct ReplicaTests {
    @Test func fullThenDeltasReproduceTheGuestExactly() throws {
        let p = try Pipeline()
        #expect(try p.deliver(p.nextEpochFrames(steps: 0, full: true))?.isCommitted == true)
        #expect(p.replicaMatchesGuest)
        for _ in 0..<20 {
            #expect(try p.deliver(p.nextEpochFrames(steps: 50))?.isCommitted == true)
            #expect(p.replicaMatchesGuest)
        }
        #expect(p.replica.committedEpoch == Epoch(21))
        #expect(p.replica.rejections.isEmpty)
    }

    /// Live rounds are applied as a base but are never a checkpoint to resume; the epoch of the
    /// pause that ends them is, and the replica is then the guest exactly.
    @Test func liveRoundsAreABaseButNotResumableUntilThePauseCommits() throws {
        let p = try Pipeline()
        guard case .committed(_, let first)? = try p.deliver(p.nextEpochFrames(steps: 0, full: true, live: true)) else {
            Issue.record("the live full round did not commit"); return
        }
        #expect(first.isLive && first.isFull)
        #expect(p.replica.hasBaseImage && !p.replica.isResumable)
        guard case .committed(_, let second)? = try p.deliver(p.nextEpochFrames(steps: 40, live: true)) else {
            Issue.record("the live delta round did not commit"); return
        }
        #expect(second.isLive)
        #expect(!p.replica.isResumable)
        #expect(try p.deliver(p.nextEpochFrames(steps: 40))?.isCommitted == true)
        #expect(p.replica.isResumable)
        #expect(p.replicaMatchesGuest)
    }

    @Test(arguments: PageContent.allCases)
    func everyContentKindRoundTrips(_ content: PageContent) throws {
        let p = try Pipeline(content: content)
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        for _ in 0..<5 { try p.deliver(p.nextEpochFrames(steps: 200)) }
        #expect(p.replicaMatchesGuest)
        #expect(p.replica.committedEpoch == Epoch(6))
    }

    @Test func everyPageEncodingIsProducedAndDecoded() throws {
        let p = try Pipeline(content: .mixed)
        var seen: Set<PageEncoding> = []
        let count = p.guest.memory.pageCount
        var frames: [[UInt8]] = []
        // Hand-made checkpoint with one page of each kind, so none is left to chance.
        try p.guest.capture(full: true, into: p.buffer)
        _ = p.encoder.encode(p.buffer, epoch: Epoch(1), generation: p.generation, baseEpoch: .none) { frames.append($0) }
        try p.deliver(frames)
        // XOR and "unchanged" need pages the peer holds with non-zero contents.
        let nonZero = (8..<count).filter { i in (0..<512).contains { p.guest.memory.page(i).load(fromByteOffset: $0 * 8, as: UInt64.self) != 0 } }
        let (xorPage, samePage) = (nonZero[0], nonZero[1])
        let zeroPage = (8..<count).first { !nonZero.contains($0) }!
        let rawPage = (8..<count).first { $0 != xorPage && $0 != samePage && $0 != zeroPage }!
        p.buffer.reset()
        let pages: [(Int, (UnsafeMutableRawPointer) -> Void)] = [
            (zeroPage, { $0.initializeMemory(as: UInt8.self, repeating: 0, count: 4096) }),
            (rawPage, { for i in 0..<512 { $0.storeBytes(of: UInt64(i + 1) &* 0x9E3779B97F4A7C15, toByteOffset: i * 8, as: UInt64.self) } }),
            (xorPage, { $0.copyMemory(from: p.guest.memory.page(xorPage), byteCount: 4096); $0.storeBytes(of: UInt64(99), toByteOffset: 64, as: UInt64.self) }),
            (samePage, { $0.copyMemory(from: p.guest.memory.page(samePage), byteCount: 4096) }),
        ].sorted { $0.0 < $1.0 }
        for (index, fill) in pages {
            let dst = try #require(p.buffer.appendPage(index: index))
            fill(dst)
        }
        frames = []
        let stats = p.encoder.encode(p.buffer, epoch: Epoch(2), generation: p.generation, baseEpoch: Epoch(1)) { frames.append($0) }
        for (k, v) in stats.pagesByEncoding where v > 0 { seen.insert(k) }
        #expect(seen.isSuperset(of: [.zero, .raw, .xorLZ4, .unchanged]))
        #expect(try p.deliver(frames)?.isCommitted == true)
        for i in 0..<p.buffer.pageCount {
            #expect(memcmp(p.replica.memory.page(p.buffer.pageIndices[i]), p.buffer.contents(at: i), 4096) == 0)
        }
        // A first-time page goes as plain LZ4.
        let fresh = try Pipeline(content: .text)
        frames = []
        try fresh.guest.capture(full: true, into: fresh.buffer)
        let s = fresh.encoder.encode(fresh.buffer, epoch: Epoch(1), generation: fresh.generation, baseEpoch: .none) { frames.append($0) }
        #expect((s.pagesByEncoding[.lz4] ?? 0) > 0)
    }

    /// S3: whatever goes wrong inside an epoch, the committed state stays byte-for-byte intact
    /// and the failure is counted with its reason.
    @Test func tornEpochLeavesCommittedStateIntact() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        try p.deliver(p.nextEpochFrames(steps: 100))
        let before = p.replicaSnapshot()
        let frames = try p.nextEpochFrames(steps: 100)
        #expect(frames.count >= 3)
        // Everything but the end record, then the link drops.
        #expect(try p.deliver(Array(frames.dropLast())) == .staged)
        #expect(p.replica.abandonStaging(reason: .torn)?.rejectReason == .torn)
        #expect(p.replicaSnapshot() == before)
        #expect(p.replica.committedEpoch == Epoch(2))
        #expect(p.replica.rejections[.torn] == 1)
    }

    @Test func corruptedFrameIsRejectedAndCounted() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        let before = p.replicaSnapshot()
        var frames = try p.nextEpochFrames(steps: 300)
        frames[1][FrameHeader.size + 20] ^= 0xFF
        var decoder = FrameDecoder()
        var caught: FrameError?
        for f in frames {
            decoder.feed(f)
            do { while let fr = try decoder.next() { _ = p.replica.accept(fr) } } catch { caught = error; break }
        }
        guard case .checksumMismatch(_, let e, _)? = caught else { Issue.record("no checksum failure"); return }
        #expect(e == 2)
        #expect(p.replica.noteCorruptFrame(epoch: Epoch(e)).rejectReason == .corruptFrame)
        #expect(p.replicaSnapshot() == before)
        #expect(p.replica.committedEpoch == Epoch(1))
    }

    @Test func reorderedFramesAreRejected() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        let before = p.replicaSnapshot()
        var frames = try p.nextEpochFrames(steps: 2000)
        #expect(frames.count >= 4)
        frames.swapAt(1, 2)
        let outcome = try p.deliver(frames)
        #expect(p.replica.rejections[.outOfSequence] == 1)
        #expect(outcome?.isCommitted != true)
        #expect(p.replicaSnapshot() == before)
    }

    @Test func duplicatedEpochIsIgnoredAndChangesNothing() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        let frames = try p.nextEpochFrames(steps: 100)
        #expect(try p.deliver(frames)?.isCommitted == true)
        let after = p.replicaSnapshot()
        #expect(try p.deliver(frames)?.rejectReason == .stale)
        #expect(p.replicaSnapshot() == after)
        #expect(p.replica.committedEpoch == Epoch(2))
    }

    @Test func missedEpochIsABaseMismatch() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        _ = try p.nextEpochFrames(steps: 100) // lost on the way
        let before = p.replicaSnapshot()
        #expect(try p.deliver(p.nextEpochFrames(steps: 100))?.rejectReason == .baseMismatch)
        #expect(p.replicaSnapshot() == before)
        // The cure is a full checkpoint.
        #expect(try p.deliver(p.nextEpochFrames(steps: 10, full: true))?.isCommitted == true)
        #expect(p.replicaMatchesGuest)
    }

    @Test func deltaBeforeAnyFullCheckpointIsRefused() throws {
        let p = try Pipeline()
        p.encoder.forgetPeerState()
        #expect(try p.deliver(p.nextEpochFrames(steps: 10))?.rejectReason == .baseMismatch)
        #expect(!p.replica.hasBaseImage)
    }

    @Test func staleGenerationIsRefused() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        p.replica.adopt(generation: Generation(2))
        let before = p.replicaSnapshot()
        #expect(try p.deliver(p.nextEpochFrames(steps: 100))?.rejectReason == .staleGeneration)
        #expect(p.replicaSnapshot() == before)
        #expect((p.replica.rejections[.staleGeneration] ?? 0) >= 1)
    }

    @Test func wrongContentIsCaughtByTheDigest() throws {
        let p = try Pipeline(content: .text)
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        // The replica's copy of a page drifts (a bug, a bad DIMM): an XOR delta on it decodes
        // to the wrong bytes, which only the content digest can notice.
        var frames = try p.nextEpochFrames(steps: 500)
        var d = FrameDecoder()
        var decoded: [Frame] = []
        for f in frames { d.feed(f); while let fr = try d.next() { decoded.append(fr) } }
        let pagesFrame = try #require(decoded.first { $0.kind == .pages })
        let firstIndex = Int(UInt64(littleEndian: pagesFrame.payload.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }))
        p.replica.memory.page(firstIndex).storeBytes(of: UInt8(0x5A), toByteOffset: 100, as: UInt8.self)
        let before = p.replicaSnapshot()
        frames = decoded.map { FrameCodec.encode($0.header, payload: $0.payload) }
        let outcome = try p.deliver(frames)
        let reason = outcome?.rejectReason
        #expect(reason == .digestMismatch || reason == .badRecord)
        #expect(p.replicaSnapshot() == before)
    }

    @Test func malformedRecordsAreRejectedNotTrusted() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        let before = p.replicaSnapshot()
        let g = p.generation
        func epochWith(_ records: [UInt8], epoch: UInt64) -> [[UInt8]] {
            [FrameCodec.encode(FrameHeader(kind: .epochBegin, generation: g, epoch: Epoch(epoch)),
                               payload: EpochBegin(isFull: false, baseEpoch: Epoch(1), guestPageCount: UInt64(p.replica.pageCount)).encoded()),
             FrameCodec.encode(FrameHeader(kind: .pages, generation: g, epoch: Epoch(epoch), sequence: 1), payload: records)]
        }
        var w = ByteWriter()
        PageRecordHeader(pageIndex: 1 << 40, encoding: .zero, length: 0).write(to: &w)
        #expect(try p.deliver(epochWith(w.bytes, epoch: 2))?.rejectReason == .badRecord)
        w = ByteWriter()
        PageRecordHeader(pageIndex: 9, encoding: .lz4, length: 40).write(to: &w)
        w.append(Array(repeating: 0xFF, count: 40))
        #expect(try p.deliver(epochWith(w.bytes, epoch: 2))?.rejectReason == .badRecord)
        w = ByteWriter()
        PageRecordHeader(pageIndex: 9, encoding: .raw, length: 4096).write(to: &w)
        w.append(Array(repeating: 1, count: 100))
        #expect(try p.deliver(epochWith(w.bytes, epoch: 2))?.rejectReason == .badRecord)
        w = ByteWriter()
        PageRecordHeader(pageIndex: 9, encoding: .zero, length: 0).write(to: &w)
        PageRecordHeader(pageIndex: 9, encoding: .zero, length: 0).write(to: &w)
        #expect(try p.deliver(epochWith(w.bytes, epoch: 2))?.rejectReason == .badRecord)
        // Geometry: a primary protecting a different-size VM.
        let wrong = [FrameCodec.encode(FrameHeader(kind: .epochBegin, generation: g, epoch: Epoch(3)),
                                       payload: EpochBegin(isFull: true, baseEpoch: .none, guestPageCount: 5).encoded())]
        #expect(try p.deliver(wrong)?.rejectReason == .geometryMismatch)
        #expect(p.replicaSnapshot() == before)
        #expect(p.replica.committedEpoch == Epoch(1))
    }

    @Test func endRecordCountsMustMatch() throws {
        let p = try Pipeline()
        try p.deliver(p.nextEpochFrames(steps: 0, full: true))
        let before = p.replicaSnapshot()
        var d = FrameDecoder()
        var frames: [Frame] = []
        for f in try p.nextEpochFrames(steps: 300) { d.feed(f); while let fr = try d.next() { frames.append(fr) } }
        var end = try #require(EpochEnd(decoding: frames.last!.payload))
        end.pageCount += 1
        frames[frames.count - 1].payload = end.encoded()
        #expect(try p.deliver(frames.map { FrameCodec.encode($0.header, payload: $0.payload) })?.rejectReason == .countMismatch)
        #expect(p.replicaSnapshot() == before)
    }
}
