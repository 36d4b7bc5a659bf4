import CGeminusSupport

/// What encoding one epoch cost and produced.
public struct EncodeStats: Sendable, Equatable {
    public var pages = 0
    public var pagesByEncoding: [PageEncoding: Int] = [:]
    /// Bytes captured: pages × 4096 plus device state.
    public var inputBytes = 0
    /// Bytes handed to the transport, headers included.
    public var wireBytes = 0
    public var frames = 0

    public init() {}

    public var compressionRatio: Double { wireBytes == 0 ? 0 : Double(inputBytes) / Double(wireBytes) }
}

/// Turns captured checkpoints into frames (docs/PROTOCOL.md). It keeps, for every page, the
/// version last sent, so a page sent before goes out as an XOR against what the secondary
/// already holds: a lightly edited page becomes a few dozen bytes.
///
/// That shadow is only right while the secondary applies every epoch in order. Whenever that
/// cannot be known (a new connection, a nack) the primary sends a full epoch, which resets it.
public final class CheckpointEncoder {
    public let pageCount: Int
    public let maxFramePayload: Int
    private let shadow: PageMemory
    private var shadowValid: DirtyPageSet
    private let compressor = LZ4PageCompressor()
    private let scratch: UnsafeMutableRawPointer
    private let compressed: UnsafeMutableRawPointer

    public init(pageCount: Int, maxFramePayload: Int = 256 << 10) throws(GeminusError) {
        precondition(maxFramePayload >= PageRecordHeader.size + GuestPage.size && maxFramePayload <= FrameHeader.maxPayloadBytes)
        self.pageCount = pageCount
        self.maxFramePayload = maxFramePayload
        shadow = try PageMemory(pageCount: pageCount)
        shadowValid = DirtyPageSet(pageCount: pageCount)
        scratch = .allocate(byteCount: GuestPage.size, alignment: 64)
        compressed = .allocate(byteCount: GuestPage.size, alignment: 64)
    }

    deinit {
        scratch.deallocate()
        compressed.deallocate()
    }

    /// Forget what the peer holds: nothing is XOR-encoded until pages are sent again.
    public func forgetPeerState() { shadowValid.removeAll() }

    /// Encodes one checkpoint as frames, handing each to `emit` as soon as it is complete so
    /// the transport can send while the rest is encoded.
    ///
    /// - Parameter baseEpoch: the epoch the secondary must hold for this delta; ignored for a
    ///   full checkpoint.
    /// `pagesSent` is told the number of pages encoded so far after each pages frame is
    /// emitted: a full checkpoint of a large guest takes seconds, and the operator sees it move.
    public func encode(_ checkpoint: CheckpointBuffer, epoch: Epoch, generation: Generation, baseEpoch: Epoch,
                       pagesSent: (Int) -> Void = { _ in },
                       emit: ([UInt8]) throws -> Void) rethrows -> EncodeStats {
        precondition(!checkpoint.isFull || checkpoint.pageCount == pageCount, "a full checkpoint must hold every page")
        var stats = EncodeStats()
        var sequence: UInt32 = 0
        func send(_ kind: FrameKind, _ payload: UnsafeRawBufferPointer) throws {
            let frame = FrameCodec.encode(FrameHeader(kind: kind, generation: generation, epoch: epoch, sequence: sequence), payload: payload)
            sequence += 1
            stats.frames += 1
            stats.wireBytes += frame.count
            try emit(frame)
        }
        let begin = EpochBegin(isFull: checkpoint.isFull, baseEpoch: checkpoint.isFull ? .none : baseEpoch, guestPageCount: UInt64(pageCount),
                               diskUnits: UInt32(checkpoint.diskSizeBytes / EpochBegin.diskUnitBytes), isLive: checkpoint.isLive)
        try begin.encoded().withUnsafeBytes { try send(.epochBegin, $0) }
        if checkpoint.isFull { shadowValid.removeAll() }

        var payload = ByteWriter(capacity: maxFramePayload)
        var digest = ContentDigest()
        for i in 0..<checkpoint.pageCount {
            let index = checkpoint.pageIndices[i]
            let page = checkpoint.contents(at: i)
            digest.addPage(index: UInt64(index), contents: page)
            if payload.bytes.count + PageRecordHeader.size + GuestPage.size > maxFramePayload {
                try payload.bytes.withUnsafeBytes { try send(.pages, $0) }
                payload = ByteWriter(capacity: maxFramePayload)
                pagesSent(stats.pages)
            }
            let encoding = encodePage(index: index, contents: page, into: &payload)
            stats.pagesByEncoding[encoding, default: 0] += 1
            stats.pages += 1
        }
        if !payload.bytes.isEmpty {
            try payload.bytes.withUnsafeBytes { try send(.pages, $0) }
        }
        try checkpoint.deviceState.withUnsafeBytes { state in
            digest.add(state)
            var offset = 0
            while offset < state.count {
                let n = min(maxFramePayload, state.count - offset)
                try send(.deviceState, UnsafeRawBufferPointer(rebasing: state[offset..<offset + n]))
                offset += n
            }
        }
        // Disk writes, in the guest's order, packed into frames (a write larger than a frame
        // is split into consecutive records; a zero write is a header alone, split only past
        // a u32 of length).
        var disk = ByteWriter(capacity: maxFramePayload)
        var diskBytes = 0
        for w in checkpoint.diskWrites {
            var done: UInt64 = 0
            repeat {
                if disk.bytes.count + DiskWrite.headerSize + (w.isZeroes ? 0 : 1) > maxFramePayload {
                    try disk.bytes.withUnsafeBytes { try send(.diskWrites, $0) }
                    disk = ByteWriter(capacity: maxFramePayload)
                }
                let offset = w.offset + done
                if w.isZeroes {
                    let n = min(w.length - done, UInt64(UInt32.max))
                    disk.u64(offset)
                    disk.u32(UInt32(n))
                    disk.u32(DiskWrite.zeroesFlag)
                    digest.addZeroWrite(offset: offset, length: n)
                    done += n
                    continue
                }
                let from = Int(done)
                let n = min(w.data.count - from, maxFramePayload - disk.bytes.count - DiskWrite.headerSize)
                disk.u64(offset)
                disk.u32(UInt32(n))
                disk.u32(0)
                w.data.withUnsafeBytes { slice in
                    let part = UnsafeRawBufferPointer(rebasing: slice[from..<from + n])
                    // The digest covers records as sent: the secondary stages each as one write.
                    digest.addDiskWrite(offset: offset, data: part)
                    disk.append(part)
                }
                done += UInt64(n)
            } while done < w.length
            diskBytes += w.isZeroes ? 0 : w.data.count
        }
        if !disk.bytes.isEmpty {
            try disk.bytes.withUnsafeBytes { try send(.diskWrites, $0) }
        }
        let end = EpochEnd(frameCount: sequence, pageCount: UInt32(checkpoint.pageCount),
                           deviceStateBytes: UInt32(checkpoint.deviceState.count), diskBytes: UInt32(diskBytes), digest: digest.value)
        try end.encoded().withUnsafeBytes { try send(.epochEnd, $0) }
        stats.inputBytes = checkpoint.payloadBytes
        return stats
    }

    /// Picks the cheapest encoding for one page, appends its record, and remembers the page as
    /// the peer's new version.
    private func encodePage(index: Int, contents page: UnsafeRawPointer, into w: inout ByteWriter) -> PageEncoding {
        let held = shadow.page(index)
        defer {
            held.copyMemory(from: page, byteCount: GuestPage.size)
            shadowValid.insert(index)
        }
        if geminus_is_zero(page, GuestPage.size) != 0 {
            PageRecordHeader(pageIndex: UInt64(index), encoding: .zero, length: 0).write(to: &w)
            return .zero
        }
        var source = page
        var encoding = PageEncoding.lz4
        if shadowValid.contains(index) {
            let changedWords = geminus_xor(scratch, page, held, GuestPage.size)
            if changedWords == 0 {
                PageRecordHeader(pageIndex: UInt64(index), encoding: .unchanged, length: 0).write(to: &w)
                return .unchanged
            }
            // A page rewritten wholesale has an XOR that is noise; trying it would cost a
            // second compression. Below half its words changed, the XOR is the better bet.
            if changedWords < GuestPage.size / 16 {
                source = UnsafeRawPointer(scratch)
                encoding = .xorLZ4
            }
        }
        // Anything LZ4 cannot bring under 15/16 of a page goes raw: decoding raw is a memcpy.
        let limit = GuestPage.size - GuestPage.size / 16
        var n = compressor.compress(source, count: GuestPage.size, into: compressed, capacity: limit)
        if n == 0 && encoding == .xorLZ4 {
            // Rewritten wholesale (new text over old): the XOR is noise, the page itself may not be.
            encoding = .lz4
            n = compressor.compress(page, count: GuestPage.size, into: compressed, capacity: limit)
        }
        if n > 0 {
            PageRecordHeader(pageIndex: UInt64(index), encoding: encoding, length: UInt16(n)).write(to: &w)
            w.append(UnsafeRawBufferPointer(start: compressed, count: n))
            return encoding
        }
        PageRecordHeader(pageIndex: UInt64(index), encoding: .raw, length: UInt16(GuestPage.size)).write(to: &w)
        w.append(UnsafeRawBufferPointer(start: page, count: GuestPage.size))
        return .raw
    }
}
