import Foundation
import GeminusCore
@testable import GeminusTransport
import Testing

/// 61 distinct pseudo-random payloads of 0..<70,000 bytes, made once (generating bytes one by
/// one in a debug build is slower than the transport under test). 61 is prime, so consecutive
/// frames never repeat a payload within a window a reordering bug could hide in.
let payloadPool: [[UInt8]] = (0..<61).map { i in
    var x = UInt64(i + 1) &* 0x9E37_79B9_7F4A_7C15
    let count = i == 0 ? 0 : Int(x % 70_000)
    var words = [UInt64](repeating: 0, count: (count + 7) / 8)
    for j in words.indices {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        words[j] = x
    }
    return words.withUnsafeBytes { Array($0.prefix(count)) }
}

func testPayload(_ i: Int) -> [UInt8] { payloadPool[i % payloadPool.count] }

func testFrame(_ i: Int, kind: FrameKind = .pages) -> [UInt8] {
    FrameCodec.encode(FrameHeader(kind: kind, generation: Generation(3), epoch: Epoch(UInt64(i / 10 + 1)), sequence: UInt32(i % 10)),
                      payload: testPayload(i))
}

/// Receives `count` frames and checks each against `testFrame`; the first mismatch or error.
func receiveAndVerify(_ c: FramedConnection, count: Int, kind: FrameKind) -> String? {
    for i in 0..<count {
        do {
            guard let f = try c.receive(timeout: .seconds(10)) else { return "frame \(i): timed out" }
            let ok = f.kind == kind && f.epoch == Epoch(UInt64(i / 10 + 1)) && f.header.sequence == UInt32(i % 10)
                && f.generation == Generation(3) && f.payload == testPayload(i)
            if !ok { return "frame \(i) differs (kind \(f.kind), epoch \(f.epoch), \(f.payload.count) bytes)" }
        } catch {
            return "frame \(i): \(error)"
        }
    }
    return nil
}

@Suite struct FramedConnectionTests {
    @Test func manyFramesBothWaysArriveIntactAndInOrder() throws {
        let pair = try ConnectedPair()
        defer { pair.close() }
        let count = 1500
        let client = pair.client, server = pair.server
        let upstream = Background { () -> String? in
            for i in 0..<count {
                do throws(GeminusError) { try client.send(testFrame(i), timeout: .seconds(10)) } catch { return "send \(i): \(error)" }
            }
            return nil
        }
        let serverReceives = Background { receiveAndVerify(server, count: count, kind: .pages) }
        for i in 0..<count {
            try server.send(testFrame(i, kind: .ack), timeout: .seconds(10))
        }
        #expect(receiveAndVerify(client, count: count, kind: .ack) == nil)
        #expect(upstream.wait() == .some(nil))
        #expect(serverReceives.wait() == .some(nil))

        try client.flush(timeout: .seconds(5))
        let c = client.stats, s = server.stats
        #expect(c.framesSent == UInt64(count) && c.framesReceived == UInt64(count))
        #expect(s.framesSent == UInt64(count) && s.framesReceived == UInt64(count))
        let payloadBytes = (0..<count).reduce(UInt64(0)) { $0 + UInt64(FrameHeader.size + testPayload($1).count) }
        #expect(c.bytesSent >= payloadBytes)
        #expect(c.queuedBytes == 0)
        #expect(try client.receive(timeout: .zero) == nil)
    }

    @Test func aPeerThatDoesNotReadMakesSendBlockThenTimeOut() throws {
        let small = LinkOptions(outboundLimitBytes: 256 << 10, inboundLimitBytes: 256 << 10)
        let pair = try ConnectedPair(options: small)
        defer { pair.close() }
        let frame = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(3), epoch: Epoch(1)),
                                      payload: [UInt8](repeating: 0x5A, count: 64 << 10))
        var sent = 0
        var failure: GeminusError?
        // Kernel buffers absorb a few MiB first; 64 MiB is far beyond them.
        while sent < 1024 {
            do throws(GeminusError) {
                try pair.client.send(frame, timeout: .milliseconds(100))
                sent += 1
            } catch {
                failure = error
                break
            }
            #expect(pair.client.stats.queuedBytes <= (256 << 10) + frame.count)
        }
        #expect(failure?.code == .timeout, "sent \(sent) frames without blocking")
        #expect(failure?.message.contains("not reading fast enough") == true)
        #expect(pair.client.stats.sendWaits >= 1)
        #expect(pair.server.stats.inboundQueuedBytes <= (256 << 10) + frame.count)
        #expect(pair.client.isOpen)

        // Once the peer reads again, everything queued arrives and sending works again.
        let reader = Background { () -> Int in
            var n = 0
            while (try? pair.server.receive(timeout: .milliseconds(500))) != nil { n += 1 }
            return n
        }
        try pair.client.send(frame, timeout: .seconds(5))
        #expect(reader.wait() == sent + 1)
    }

    @Test func idleConnectionKeepsLastHeardFresh() throws {
        let pair = try ConnectedPair(options: LinkOptions(heartbeatInterval: .milliseconds(10)))
        defer { pair.close() }
        var worstAgeMillis = 0.0
        let start = Monotonic.nanos()
        while elapsedMillis(since: start) < 300 {
            #expect(try pair.server.receive(timeout: .milliseconds(20)) == nil, "heartbeats are not handed out")
            for c in [pair.client, pair.server] {
                worstAgeMillis = max(worstAgeMillis, Double(Monotonic.nanos() - c.lastHeardNanos) / 1e6)
            }
        }
        #expect(worstAgeMillis < 100, "silence of \(worstAgeMillis) ms on an idle healthy link")
        #expect(pair.server.stats.heartbeatsReceived >= 5)
        #expect(pair.client.stats.heartbeatsSent >= 5)
        #expect(pair.server.stats.framesReceived == 0)
    }

    @Test func receiveThrowsPromptlyAfterThePeerCloses() throws {
        let pair = try ConnectedPair()
        defer { pair.close() }
        for i in 0..<3 { try pair.client.send(testFrame(i), timeout: .seconds(1)) }
        try pair.client.flush(timeout: .seconds(1))
        let server = pair.server
        let waiting = Background { () -> (frames: Int, error: GeminusError?, millis: Double) in
            var frames = 0
            while true {
                do throws(GeminusError) {
                    guard try server.receive(timeout: .seconds(10)) != nil else { return (frames, nil, 0) }
                    frames += 1
                    if frames == 3 { break }
                } catch {
                    return (frames, error, 0)
                }
            }
            let start = Monotonic.nanos()
            do throws(GeminusError) {
                _ = try server.receive(timeout: .seconds(10))
                return (frames, nil, elapsedMillis(since: start))
            } catch {
                return (frames, error, elapsedMillis(since: start))
            }
        }
        Monotonic.sleep(nanos: 20_000_000)
        pair.client.close()
        let r = try #require(waiting.wait())
        #expect(r.frames == 3, "frames sent before the close are still delivered")
        #expect(r.error?.code == .connectionFailed)
        #expect(r.error?.message.contains("peer closed the connection") == true)
        #expect(r.millis < 500)
        #expect(pair.server.closeReason == .peerClosed)
        #expect(!pair.server.isOpen)
        #expect(pair.client.closeReason == .closedLocally)
    }

    // A byte corrupted on the wire: SealedFrameTests.aBitFlippedOnTheWireEndsTheConnectionNamingTheFrame.

    @Test func closeWakesBlockedSenderAndReceiver() throws {
        let small = LinkOptions(outboundLimitBytes: 64 << 10, inboundLimitBytes: 64 << 10)
        let pair = try ConnectedPair(options: small)
        defer { pair.close() }
        let client = pair.client
        let frame = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(3), epoch: Epoch(1)),
                                      payload: [UInt8](repeating: 0, count: 60 << 10))
        let sender = Background { () -> GeminusError? in
            while true {
                do throws(GeminusError) { try client.send(frame, timeout: .seconds(30)) } catch { return error }
            }
        }
        let receiver = Background { () -> GeminusError? in
            do throws(GeminusError) { _ = try client.receive(timeout: .seconds(30)); return nil } catch { return error }
        }
        // Let the sender fill every buffer and block.
        let start = Monotonic.nanos()
        while client.stats.sendWaits == 0 && elapsedMillis(since: start) < 5000 { Monotonic.sleep(nanos: 5_000_000) }
        Monotonic.sleep(nanos: 20_000_000)
        let closeStart = Monotonic.nanos()
        client.close()
        client.close()
        #expect(sender.wait(seconds: 2)??.code == .connectionFailed)
        #expect(receiver.wait(seconds: 2)??.code == .connectionFailed)
        #expect(elapsedMillis(since: closeStart) < 1000)
        #expect(throws: GeminusError.self) { try client.send(frame, timeout: .zero) }
    }

    @Test func droppingTheLastReferenceClosesTheConnection() throws {
        var pair: ConnectedPair? = try ConnectedPair()
        let server = pair!.server
        let listener = pair!.listener
        defer { server.close(); listener.close() }
        pair = nil
        let error = #expect(throws: GeminusError.self) { _ = try server.receive(timeout: .seconds(5)) }
        #expect(error?.message.contains("peer closed the connection") == true)
    }
}
