import Foundation
import GeminusCore
@testable import GeminusTransport
import Testing

@Suite struct HandshakeTests {
    @Test func peersLearnEachOthersHello() throws {
        let pair = try ConnectedPair()
        defer { pair.close() }
        #expect(pair.server.peer == primaryHello())
        #expect(pair.client.peer == secondaryHello())
        #expect(pair.client.remoteAddress == "127.0.0.1:\(pair.listener.port)")
        #expect(pair.server.remoteAddress.hasPrefix("127.0.0.1:"))
    }

    @Test func wrongKeyIsRefusedOnBothSidesWithAClearMessage() throws {
        let serverKey = try makeKey("secondary.key")
        let clientKey = try makeKey("primary.key")
        let logs = LogCapture()
        let listener = try TCPListener(host: "127.0.0.1", port: 0, logger: logs.logger)
        defer { listener.close() }
        let accepted = acceptInBackground(listener, key: serverKey)

        let clientError = #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: listener.port, key: clientKey, local: primaryHello(), timeout: .seconds(5))
        }
        #expect(clientError?.code == .authenticationFailed)
        #expect(clientError?.message.contains("authentication failed") == true)
        #expect(clientError?.message.contains(clientKey.path) == true)

        let serverResult = try #require(accepted.wait())
        guard case .failure(let serverError) = serverResult else {
            Issue.record("the listener admitted a peer with the wrong key")
            return
        }
        #expect(serverError.code == .authenticationFailed)
        let expectedLine = "authentication failed (peer does not hold the pair key in \(serverKey.path))"
        #expect(serverError.message.hasPrefix("refused connection from 127.0.0.1:"))
        #expect(serverError.message.hasSuffix(expectedLine))
        #expect(logs.all.contains { $0.hasPrefix("warning: refused connection from 127.0.0.1:") && $0.hasSuffix(expectedLine) },
                "log: \(logs.all)")
    }

    @Test func listenerSurvivesAFailedHandshake() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let first = acceptInBackground(listener, key: key)
        #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: listener.port, key: try makeKey(), local: primaryHello(), timeout: .seconds(5))
        }
        guard case .failure = try #require(first.wait()) else {
            Issue.record("first handshake should have failed")
            return
        }
        let second = acceptInBackground(listener, key: key)
        let client = try TCPDialer.connect(host: "127.0.0.1", port: listener.port, key: key, local: primaryHello(), timeout: .seconds(5))
        defer { client.close() }
        let result = try #require(second.wait())
        let server = try #require(try result.get())
        defer { server.close() }
        #expect(server.peer.vmName == "web-1")
    }

    /// Version 1 sent every frame in the clear: a v1 peer is refused, never served (no fallback).
    @Test func aVersion1PeerIsRefusedNamingBothVersions() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let accepted = acceptInBackground(listener, key: key)
        let fd = try rawConnect(port: listener.port)
        defer { close(fd) }
        let payload = [UInt8](repeating: 7, count: 32) + (try primaryHello().encoded())
        rawSend(fd, FrameCodec.encode(FrameHeader(kind: .hello, generation: Generation(3), epoch: .none, version: 1), payload: payload))

        guard case .failure(let error) = try #require(accepted.wait()) else {
            Issue.record("a version-1 hello was accepted")
            return
        }
        #expect(error.code == .protocolMismatch)
        #expect(error.message.contains(FrameError.unsupportedVersion(1).description))
        #expect(error.message.contains("version 2") && error.message.contains("version 1"))

        // The listener answers in its own framing so the other release can say the same.
        var answer = FrameDecoder()
        answer.feed(rawReadAll(fd))
        let refusal = try #require(try answer.next())
        #expect(refusal.kind == .refused)
        #expect(refusal.payload.first == Handshake.Refusal.protocolError.rawValue)
    }

    @Test func dataFramesBeforeTheHandshakeAreRefused() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let accepted = acceptInBackground(listener, key: key)
        let fd = try rawConnect(port: listener.port)
        defer { close(fd) }
        rawSend(fd, FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(3), epoch: Epoch(1)), payload: [1, 2, 3]))
        guard case .failure(let error) = try #require(accepted.wait()) else {
            Issue.record("a connection that skipped the handshake was accepted")
            return
        }
        #expect(error.code == .protocolMismatch)
        #expect(error.message.contains("pages frame instead of a hello"))
    }

    @Test func dialerReportsAPeerOfAnotherVersion() throws {
        let server = try RawServer { fd in
            _ = rawReadAll(fd, limit: 1) // the hello's first byte is enough
            rawSend(fd, FrameCodec.encode(FrameHeader(kind: .challenge, generation: Generation(1), epoch: .none, version: 9)))
        }
        let error = #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: server.port, key: try makeKey(), local: primaryHello(), timeout: .seconds(5))
        }
        #expect(error?.code == .protocolMismatch)
        #expect(error?.message.contains(FrameError.unsupportedVersion(9).description) == true)
    }

    /// A `refused` frame is unauthenticated (anyone on the path can send one): its text is
    /// shown marked as the peer's claim, with no newlines or terminal escapes to forge log
    /// lines with, and bounded.
    @Test func aRefusalsTextIsShownSanitisedAndMarkedUntrusted() throws {
        let forged = "all good\n2026-12-06 error geminus: fake line\u{1B}[2J" + String(repeating: "x", count: 5000)
        let server = try RawServer { fd in
            _ = rawReadAll(fd, limit: 1)
            rawSend(fd, FrameCodec.encode(FrameHeader(kind: .refused, generation: Generation(1), epoch: .none),
                                          payload: Handshake.refusalPayload(.notAdmitted, forged)))
        }
        let error = #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: server.port, key: try makeKey(), local: primaryHello(), timeout: .seconds(5))
        }
        let message = try #require(error?.message)
        #expect(!message.contains("\n") && !message.contains("\u{1B}"))
        #expect(message.contains("all good?2026-12-06 error geminus: fake line?[2J"))
        #expect(message.contains("unauthenticated"))
        #expect(message.count < 400)
    }

    @Test func httpRequestIsNotAGeminusAgent() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let accepted = acceptInBackground(listener, key: key)
        let fd = try rawConnect(port: listener.port)
        defer { close(fd) }
        let start = Monotonic.nanos()
        // Shorter than a frame header, and then the client waits: must not take the full timeout.
        rawSend(fd, Array("GET / HTTP/1.1\r\n\r\n".utf8))
        guard case .failure(let error) = try #require(accepted.wait()) else {
            Issue.record("an HTTP client was accepted")
            return
        }
        #expect(error.code == .protocolMismatch)
        #expect(error.message.contains("peer is not a Geminus agent"))
        #expect(elapsedMillis(since: start) < 1000)
        // And the listener is still there for the real primary.
        let next = acceptInBackground(listener, key: key)
        let client = try TCPDialer.connect(host: "127.0.0.1", port: listener.port, key: key, local: primaryHello(), timeout: .seconds(5))
        client.close()
        let result = try #require(next.wait())
        try #require(try result.get()).close()
    }

    @Test func dialingAWebServerIsNotAGeminusAgent() throws {
        let server = try RawServer { fd in
            _ = rawReadAll(fd, limit: 1)
            rawSend(fd, Array("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".utf8))
        }
        let error = #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: server.port, key: try makeKey(), local: primaryHello(), timeout: .seconds(5))
        }
        #expect(error?.code == .protocolMismatch)
        #expect(error?.message.contains("peer is not a Geminus agent") == true)
    }

    @Test func admissionRefusalReachesThePrimaryWithTheReason() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let accepted = acceptInBackground(listener, key: key) { peer in
            peer.generation < Generation(5) ? "generation \(peer.generation) is stale: the pair is at generation 5" : nil
        }
        let error = #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: listener.port, key: key, local: primaryHello(generation: 3), timeout: .seconds(5))
        }
        #expect(error?.code == .peerRefused)
        #expect(error?.message.contains("generation 3 is stale: the pair is at generation 5") == true)
        guard case .failure(let serverError) = try #require(accepted.wait()) else {
            Issue.record("the stale primary was admitted")
            return
        }
        #expect(serverError.code == .peerRefused)
    }

    @Test func silentClientTimesOutTheHandshake() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let accepted = acceptInBackground(listener, key: key, options: LinkOptions(handshakeTimeout: .milliseconds(150)))
        let fd = try rawConnect(port: listener.port)
        defer { close(fd) }
        let start = Monotonic.nanos()
        guard case .failure(let error) = try #require(accepted.wait()) else {
            Issue.record("a silent client was accepted")
            return
        }
        #expect(error.code == .timeout)
        #expect(elapsedMillis(since: start) < 2000)
    }

    @Test func impostorSecondaryWithoutTheKeyIsDetected() throws {
        // A server that answers the hello with a well-formed challenge but cannot compute the
        // accepted MAC: the primary must not take it for its secondary.
        let server = try RawServer { fd in
            var decoder = FrameDecoder()
            var buf = [UInt8](repeating: 0, count: 4096)
            func next() -> Frame? {
                while true {
                    if let f = try? decoder.next() { return f }
                    let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                    if n <= 0 { return nil }
                    decoder.feed(Array(buf[0..<n]))
                }
            }
            guard next()?.kind == .hello else { return }
            let challenge = [UInt8](repeating: 9, count: 32) + (try! secondaryHello().encoded())
            rawSend(fd, FrameCodec.encode(FrameHeader(kind: .challenge, generation: Generation(3), epoch: .none), payload: challenge))
            guard next()?.kind == .auth else { return }
            rawSend(fd, FrameCodec.encode(FrameHeader(kind: .accepted, generation: Generation(3), epoch: .none),
                                          payload: [UInt8](repeating: 0, count: 32)))
            _ = rawReadAll(fd)
        }
        let key = try makeKey()
        let error = #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: server.port, key: key, local: primaryHello(), timeout: .seconds(5))
        }
        #expect(error?.code == .authenticationFailed)
        #expect(error?.message.contains("could not prove it holds the pair key in \(key.path)") == true)
    }

    @Test func helloEncodingRoundTripsAndRejectsMalformedInput() throws {
        let hello = PeerHello(role: .secondary, vmName: "dätabase-ü", generation: Generation(9), committedEpoch: Epoch(1234),
                              guestPageCount: 1 << 30, agentVersion: "0.1.0")
        let bytes = try hello.encoded()
        #expect(bytes.count == PeerHello.fixedBytes + "dätabase-ü".utf8.count + 5)
        #expect(PeerHello(decoding: bytes) == hello)
        #expect(PeerHello(decoding: Array(bytes.dropLast())) == nil)
        #expect(PeerHello(decoding: bytes + [0]) == nil)
        var badRole = bytes
        badRole[0] = 7
        #expect(PeerHello(decoding: badRole) == nil)
        let long = PeerHello(role: .primary, vmName: String(repeating: "x", count: 256), generation: Generation(1),
                             committedEpoch: .none, guestPageCount: 1, agentVersion: "")
        #expect(throws: GeminusError.self) { try long.encoded() }
    }

    @Test func helloCarriesThePlatformAndRejectsAMalformedOne() throws {
        let platform = GuestPlatform([("machine type", "pc-i440fx-7.2"), ("QEMU version", "7.2.19"), ("vCPUs", "1")])
        let hello = PeerHello(role: .primary, vmName: "billing-1", generation: Generation(2), committedEpoch: .none,
                              guestPageCount: 4096, agentVersion: "0.1.0", platform: platform)
        let bytes = try hello.encoded()
        let decoded = try #require(PeerHello(decoding: bytes))
        #expect(decoded.platform == platform)
        #expect(decoded == hello)
        // A platform line without '=' is malformed, not a fact with an empty value.
        var bad = bytes
        let at = try #require(bad.firstIndex(of: UInt8(ascii: "=")))
        bad[at] = UInt8(ascii: ":")
        #expect(PeerHello(decoding: bad) == nil)
        // A length beyond the limit is refused before anything is read.
        var huge = bytes
        huge[3] = 0xFF
        huge[4] = 0xFF
        #expect(PeerHello(decoding: huge) == nil)
    }

    @Test func platformDifferencesNameEveryFactAndIgnoreAnUnknownPlatform() {
        let primary = GuestPlatform([("machine type", "pc-i440fx-7.2"), ("QEMU version", "7.2.19"), ("vCPUs", "2")])
        #expect(primary.differences(fromPrimary: primary) == [])
        #expect(GuestPlatform().differences(fromPrimary: primary) == [])
        #expect(primary.differences(fromPrimary: GuestPlatform()) == [])
        let standby = GuestPlatform([("machine type", "pc-q35-7.2"), ("QEMU version", "7.2.19"), ("hugepages", "no")])
        #expect(standby.differences(fromPrimary: primary) == [
            "machine type: pc-i440fx-7.2 on the primary, pc-q35-7.2 here",
            "vCPUs: 2 on the primary, not known here",
            "hugepages: not known on the primary, no here",
        ])
    }
}

/// A one-shot TCP server on 127.0.0.1 that runs `conversation` with the first client.
final class RawServer: @unchecked Sendable {
    let port: UInt16
    private let fd: Int32

    init(_ conversation: @escaping @Sendable (Int32) -> Void) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let fd = self.fd
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        try #require(bound == 0 && listen(fd, 4) == 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        port = UInt16(bigEndian: addr.sin_port)
        Thread {
            let client = accept(fd, nil, nil)
            guard client >= 0 else { return }
            conversation(client)
            close(client)
        }.start()
    }

    deinit {
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }
}
