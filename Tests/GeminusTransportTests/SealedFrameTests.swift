import Foundation
import GeminusCore
import GeminusTestSupport
@testable import GeminusTransport
import Testing

/// Protocol v2's sealed frames against a man in the middle (review finding C1): every frame
/// after the handshake is AES-256-GCM under per-direction keys with the frame counter as the
/// nonce, so a flipped, forged, replayed, reordered or dropped frame ends the connection and
/// is never handed to the node.
@Suite struct SealedFrameTests {
    /// What the relay saw and did, shared between its pump threads and the test.
    final class Tally: @unchecked Sendable {
        private let lock = NSLock()
        private var frames: [TamperingRelay.WireFrame] = []
        private var held: [UInt8]?
        var seen: [TamperingRelay.WireFrame] { lock.withLock { frames } }
        func note(_ f: TamperingRelay.WireFrame) { lock.withLock { frames.append(f) } }
        func hold(_ b: [UInt8]) { lock.withLock { held = b } }
        func takeHeld() -> [UInt8]? { lock.withLock { defer { held = nil }; return held } }
    }

    static let epochBegin = FrameCodec.encode(FrameHeader(kind: .epochBegin, generation: Generation(3), epoch: Epoch(42)),
                                              payload: EpochBegin(isFull: false, baseEpoch: Epoch(41), guestPageCount: 16).encoded())
    static let pages = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(3), epoch: Epoch(42), sequence: 1),
                                         payload: [UInt8](repeating: 1, count: 5000))

    /// A pair through a relay that applies `attack` to frames travelling to the listener
    /// (the secondary's side) and passes everything else.
    static func attackedPair(_ tally: Tally = Tally(),
                             toListener attack: @escaping @Sendable (TamperingRelay.WireFrame) -> [[UInt8]]) throws -> ConnectedPair {
        try ConnectedPair(relay: { port in
            try TamperingRelay(targetPort: port) { _, direction, frame in
                tally.note(frame)
                return direction == .toListener && frame.sealed ? attack(frame) : [frame.bytes]
            }
        })
    }

    /// Receives until the connection ends; the kinds that were handed out before it did.
    static func drain(_ c: FramedConnection) -> [FrameKind] {
        var kinds: [FrameKind] = []
        while true {
            do {
                guard let f = try c.receive(timeout: .seconds(5)) else { return kinds }
                kinds.append(f.kind)
            } catch {
                return kinds
            }
        }
    }

    @Test func framesArriveThroughAnHonestRelayAndAreNotReadableOnTheWire() throws {
        let tally = Tally()
        let pair = try Self.attackedPair(tally) { [$0.bytes] }
        defer { pair.close() }
        try pair.client.send(Self.epochBegin, timeout: .seconds(1))
        try pair.client.send(Self.pages, timeout: .seconds(1))
        #expect(try pair.server.receive(timeout: .seconds(5))?.kind == .epochBegin)
        let pages = try #require(try pair.server.receive(timeout: .seconds(5)))
        #expect(pages.payload == [UInt8](repeating: 1, count: 5000))

        let onWire = try #require(tally.seen.first { $0.kind == FrameKind.pages.rawValue })
        #expect(onWire.sealed)
        #expect(onWire.bytes.count == FrameHeader.size + 5000 + FrameHeader.sealTagBytes)
        // 5000 bytes of 0x01 in the clear would show as long runs; ciphertext has none.
        let body = onWire.bytes[FrameHeader.size..<FrameHeader.size + 5000]
        #expect(body.filter { $0 == 1 }.count < 100, "payload crossed the wire in the clear")
        // Handshake frames are the only ones in the clear; everything after is sealed,
        // heartbeats included.
        let clear = tally.seen.filter { !$0.sealed }.map(\.kind)
        #expect(Set(clear).isSubset(of: [FrameKind.hello, .challenge, .auth, .accepted].map(\.rawValue)))
    }

    @Test func aBitFlippedOnTheWireEndsTheConnectionNamingTheFrame() throws {
        let pair = try Self.attackedPair { f in
            f.kind == FrameKind.pages.rawValue ? [ForgedFrame.flipped(f.bytes, at: FrameHeader.size + 1234, bit: 4)] : [f.bytes]
        }
        defer { pair.close() }
        try pair.client.send(Self.epochBegin, timeout: .seconds(1))
        try pair.client.send(Self.pages, timeout: .seconds(1))
        #expect(Self.drain(pair.server) == [.epochBegin])
        #expect(pair.server.closeReason?.frameError == .unauthenticated(kind: FrameKind.pages.rawValue, epoch: 42, sequence: 1))
        #expect(pair.server.closeReason?.corruptEpoch == Epoch(42))
        #expect(pair.server.closeReason?.description.contains("failed authentication") == true)
    }

    @Test func aRewrittenHeaderWithARecomputedHeaderCRCIsRefused() throws {
        // The header CRC is public: an attacker who changes the epoch recomputes it. The header
        // is the AEAD's associated data, so the tag still fails.
        let pair = try Self.attackedPair { f in
            guard f.kind == FrameKind.epochBegin.rawValue else { return [f.bytes] }
            var b = f.bytes
            b[24] = 99
            b.withUnsafeMutableBytes { FrameCodec.markSealed(header: UnsafeMutableRawBufferPointer(rebasing: $0[0..<FrameHeader.size])) }
            return [b]
        }
        defer { pair.close() }
        try pair.client.send(Self.epochBegin, timeout: .seconds(1))
        #expect(Self.drain(pair.server) == [])
        #expect(pair.server.closeReason?.frameError == .unauthenticated(kind: FrameKind.epochBegin.rawValue, epoch: 99, sequence: 0))
    }

    @Test func aReplayedFrameIsRefused() throws {
        let pair = try Self.attackedPair { f in
            f.kind == FrameKind.pages.rawValue ? [f.bytes, f.bytes] : [f.bytes]
        }
        defer { pair.close() }
        try pair.client.send(Self.epochBegin, timeout: .seconds(1))
        try pair.client.send(Self.pages, timeout: .seconds(1))
        #expect(Self.drain(pair.server) == [.epochBegin, .pages])
        #expect(pair.server.closeReason?.frameError == .unauthenticated(kind: FrameKind.pages.rawValue, epoch: 42, sequence: 1))
    }

    @Test func aDroppedFrameMakesTheNextOneFail() throws {
        let pair = try Self.attackedPair { f in
            f.kind == FrameKind.epochBegin.rawValue ? [] : [f.bytes]
        }
        defer { pair.close() }
        try pair.client.send(Self.epochBegin, timeout: .seconds(1))
        try pair.client.send(Self.pages, timeout: .seconds(1))
        #expect(Self.drain(pair.server) == [])
        #expect(pair.server.closeReason?.frameError == .unauthenticated(kind: FrameKind.pages.rawValue, epoch: 42, sequence: 1))
    }

    @Test func reorderedFramesAreRefused() throws {
        let tally = Tally()
        let pair = try Self.attackedPair(tally) { f in
            if f.kind == FrameKind.epochBegin.rawValue {
                tally.hold(f.bytes)
                return []
            }
            return [f.bytes] + (tally.takeHeld().map { [$0] } ?? [])
        }
        defer { pair.close() }
        try pair.client.send(Self.epochBegin, timeout: .seconds(1))
        try pair.client.send(Self.pages, timeout: .seconds(1))
        #expect(Self.drain(pair.server) == [])
        #expect(pair.server.closeReason?.frameError == .unauthenticated(kind: FrameKind.pages.rawValue, epoch: 42, sequence: 1))
    }

    @Test func aForgedAckInTheClearIsRefusedByThePrimarySide() throws {
        // The forged ack travels to the dialer (the primary), as in the review's reproduction.
        let pair = try ConnectedPair(relay: { port in
            try TamperingRelay(targetPort: port) { _, direction, frame in
                guard direction == .toDialer, frame.sealed else { return [frame.bytes] }
                return [ForgedFrame.clear(.ack, generation: frame.generation, epoch: 42), frame.bytes]
            }
        })
        defer { pair.close() }
        #expect(Self.drain(pair.client) == [])
        #expect(pair.client.closeReason?.frameError == .sealingOutOfPlace(sealed: false))
    }

    @Test func aForgedSealedHandoverIsRefused() throws {
        let pair = try Self.attackedPair { f in
            [ForgedFrame.sealed(.handover, generation: f.generation, epoch: 42), f.bytes]
        }
        defer { pair.close() }
        #expect(Self.drain(pair.server) == [])
        #expect(pair.server.closeReason?.frameError == .unauthenticated(kind: FrameKind.handover.rawValue, epoch: 42, sequence: 0))
    }

    @Test func injectedBytesDoNotKeepThePeerAlive() throws {
        // The relay swallows the secondary's real frames and instead dribbles a forged frame's
        // bytes, one per heartbeat it swallows: bytes keep arriving, but no frame verifies, so
        // the primary's view of when it last heard the peer must not move.
        let started = Tally()
        let pair = try ConnectedPair(relay: { port in
            try TamperingRelay(targetPort: port) { _, direction, frame in
                guard direction == .toDialer, frame.sealed else { return [frame.bytes] }
                if started.seen.isEmpty {
                    started.note(frame)
                    let forged = ForgedFrame.sealed(.ack, generation: frame.generation, epoch: 1, payload: [UInt8](repeating: 0, count: 1 << 20))
                    return [Array(forged.prefix(FrameHeader.size + 1))]
                }
                return [[0]]
            }
        })
        defer { pair.close() }
        Thread.sleep(forTimeInterval: 0.1)
        let heard = pair.client.lastHeardNanos
        let received = pair.client.stats.bytesReceived
        Thread.sleep(forTimeInterval: 0.4)
        #expect(pair.client.stats.bytesReceived > received + 10, "the relay should have dribbled bytes")
        #expect(pair.client.lastHeardNanos == heard)
        #expect(pair.client.isOpen)
    }

    @Test func eachDirectionAndEachConnectionHasItsOwnKey() throws {
        let key = [UInt8](repeating: 7, count: 32)
        let n1 = [UInt8](repeating: 1, count: 32), n2 = [UInt8](repeating: 2, count: 32), n3 = [UInt8](repeating: 3, count: 32)
        let client = SessionKeys.derive(pairKey: key, nonceC: n1, nonceS: n2, helloC: [1], helloS: [2], isClient: true)
        let server = SessionKeys.derive(pairKey: key, nonceC: n1, nonceS: n2, helloC: [1], helloS: [2], isClient: false)
        #expect(client.send == server.receive && client.receive == server.send)
        #expect(client.send != client.receive)
        let later = SessionKeys.derive(pairKey: key, nonceC: n1, nonceS: n3, helloC: [1], helloS: [2], isClient: true)
        #expect(later.send != client.send)
        let otherHello = SessionKeys.derive(pairKey: key, nonceC: n1, nonceS: n2, helloC: [9], helloS: [2], isClient: true)
        #expect(otherHello.send != client.send)
    }

    @Test func hkdfMatchesRFC5869TestCase1() {
        // RFC 5869 A.1, first 32 bytes of OKM.
        let ikm = [UInt8](repeating: 0x0b, count: 22)
        let salt: [UInt8] = Array(0x00...0x0c)
        let info: [UInt8] = Array(0xf0...0xf9)
        let okm = Crypto.hkdfSHA256(secret: ikm, salt: salt, info: info)
        let hex = okm.map { String(format: "%02x", $0) }.joined()
        #expect(hex == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf")
    }
}
