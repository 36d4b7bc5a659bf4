import Testing
@testable import GeminusCore

@Suite struct WireFormatTests {
    @Test func frameRoundTripKeepsEveryHeaderField() throws {
        for kind in FrameKind.allCases {
            let payload: [UInt8] = (0..<100).map { UInt8($0) }
            let header = FrameHeader(kind: kind, generation: Generation(7), epoch: Epoch(42), sequence: 9, flags: 3)
            var decoder = FrameDecoder()
            decoder.feed(FrameCodec.encode(header, payload: payload))
            let frame = try #require(try decoder.next())
            #expect(frame.header.kind == kind)
            #expect(frame.header.generation == Generation(7))
            #expect(frame.header.epoch == Epoch(42))
            #expect(frame.header.sequence == 9)
            #expect(frame.header.flags == 3)
            #expect(frame.payload == payload)
            #expect(try decoder.next() == nil)
        }
    }

    @Test func decoderWaitsForWholeFramesFedByteByByte() throws {
        let bytes = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(1), epoch: Epoch(1)), payload: [1, 2, 3])
            + FrameCodec.encode(FrameHeader(kind: .ack, generation: Generation(1), epoch: Epoch(1)))
        var decoder = FrameDecoder()
        var frames: [Frame] = []
        for b in bytes {
            decoder.feed([b])
            while let f = try decoder.next() { frames.append(f) }
        }
        #expect(frames.map(\.kind) == [.pages, .ack])
        #expect(frames[0].payload == [1, 2, 3])
    }

    @Test func everyFlippedByteIsCaught() throws {
        let good = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(1), epoch: Epoch(5), sequence: 2), payload: Array(repeating: 0xAB, count: 64))
        for i in 0..<good.count {
            var bad = good
            bad[i] ^= 0x10
            var decoder = FrameDecoder()
            decoder.feed(bad)
            // A flipped length may leave the decoder waiting for more bytes; that is also not
            // a frame. Anything else must be a specific error, never a silently wrong frame.
            do {
                let frame = try decoder.next()
                #expect(frame == nil, "byte \(i) flipped still produced a frame")
            } catch {
                #expect(Bool(true))
            }
        }
    }

    @Test func versionMagicAndSizeAreReportedAsSuch() throws {
        // Version 1 (frames in the clear) is refused, never decoded: no fallback.
        var v1 = FrameCodec.encode(FrameHeader(kind: .hello, generation: Generation(1), epoch: .none))
        v1[4] = 1
        var d = FrameDecoder()
        d.feed(v1)
        #expect(throws: FrameError.unsupportedVersion(1)) { try d.next() }
        #expect(FrameError.unsupportedVersion(1).description.contains("same Geminus release"))

        var http = FrameDecoder()
        http.feed(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(throws: FrameError.badMagic(0x2054_4547)) { try http.next() }

        var big = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(1), epoch: Epoch(1)))
        big.replaceSubrange(8..<12, with: [0xFF, 0xFF, 0xFF, 0x7F])
        // A length mangled in transit fails the header's own CRC at once, before any payload
        // is waited for (the simulator found a stream wedged by one).
        var mangled = FrameDecoder()
        mangled.feed(big)
        #expect(throws: FrameError.checksumMismatch(kind: FrameKind.pages.rawValue, epoch: 1, sequence: 0)) { try mangled.next() }
        // A peer that really announces that much (header CRC right) is told the limit.
        let headerCRC = CRC32C.checksum(Array(big[0..<32]))
        withUnsafeBytes(of: headerCRC.littleEndian) { big.replaceSubrange(36..<40, with: $0) }
        var b = FrameDecoder()
        b.feed(big)
        #expect(throws: FrameError.payloadTooLarge(0x7FFF_FFFF)) { try b.next() }
    }

    @Test func aCorruptedLengthIsCaughtBeforeThePayloadIsAwaited() {
        var frame = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(1), epoch: Epoch(7), sequence: 2),
                                      payload: [UInt8](repeating: 3, count: 100))
        frame[9] ^= 0x04 // the length now claims 1024 more bytes than follow
        var d = FrameDecoder()
        d.feed(Array(frame[0..<FrameHeader.size]))
        #expect(throws: FrameError.checksumMismatch(kind: FrameKind.pages.rawValue, epoch: 7, sequence: 2)) { try d.next() }
    }

    @Test func crc32cMatchesTheStandardCheckValue() {
        // The CRC-32C check value from RFC 3720 / the CRC catalogue.
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        let data: [UInt8] = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let whole = CRC32C.checksum(data)
        let split = CRC32C.checksum(Array(data[300...]), continuing: CRC32C.checksum(Array(data[..<300])))
        #expect(whole == split)
    }

    /// The hardware path runs three interleaved lanes over 12 KiB blocks and merges them; it
    /// must agree with the plain table-driven CRC at every length, offset and starting value,
    /// in particular around the block boundaries.
    @Test func fastCRCAgreesWithTheReference() {
        var rng = SystemRandomNumberGenerator()
        let data: [UInt8] = (0..<70_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let lengths = [0, 1, 7, 8, 9, 4095, 4096, 12_287, 12_288, 12_289, 24_576, 24_577, 36_863, 65_536, 69_990]
        for offset in 0..<9 {
            for n in lengths {
                let slice = Array(data[offset..<offset + n])
                let start = UInt32.random(in: 0...UInt32.max)
                #expect(CRC32C.checksum(slice, continuing: start) == CRC32C.referenceChecksum(slice, continuing: start),
                        "length \(n) offset \(offset)")
            }
        }
    }

    @Test func payloadRecordsRoundTrip() throws {
        let b = EpochBegin(isFull: true, baseEpoch: Epoch(3), guestPageCount: 1234)
        #expect(EpochBegin(decoding: b.encoded()) == b)
        let e = EpochEnd(frameCount: 5, pageCount: 77, deviceStateBytes: 13_000, digest: 0xDEAD_BEEF_0123_4567, captureMicros: 9)
        #expect(EpochEnd(decoding: e.encoded()) == e)
        let n = Nack(reason: .digestMismatch, detail: "x")
        #expect(Nack(decoding: n.encoded()) == n)
        #expect(EpochBegin(decoding: Array(b.encoded().dropLast())) == nil)
        #expect(EpochEnd(decoding: e.encoded() + [0]) == nil)
    }
}
