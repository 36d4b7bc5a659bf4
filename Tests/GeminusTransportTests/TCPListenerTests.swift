import Foundation
import GeminusCore
@testable import GeminusTransport
import Testing

@Suite struct TCPListenerTests {
    @Test func portInUseIsAddressInUse() throws {
        let first = try TCPListener(host: "127.0.0.1", port: 0)
        defer { first.close() }
        let error = #expect(throws: GeminusError.self) { _ = try TCPListener(host: "127.0.0.1", port: first.port) }
        #expect(error?.code == .addressInUse)
        #expect(error?.description ==
            "port \(first.port) on 127.0.0.1 is in use by another process; choose another with --listen or stop the other process")
    }

    @Test func closedListenerFreesThePort() throws {
        let first = try TCPListener(host: "127.0.0.1", port: 0)
        let port = first.port
        first.close()
        let second = try TCPListener(host: "127.0.0.1", port: port)
        second.close()
    }

    @Test func nobodyListeningIsConnectionRefused() throws {
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        let port = listener.port
        listener.close()
        let error = #expect(throws: GeminusError.self) {
            _ = try TCPDialer.connect(host: "127.0.0.1", port: port, key: try makeKey(), local: primaryHello(), timeout: .seconds(2))
        }
        #expect(error?.code == .connectionFailed)
        #expect(error?.message == "no Geminus agent listening on 127.0.0.1:\(port) (connection refused)")
    }

    @Test func acceptReturnsNilOnTimeout() throws {
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let start = Monotonic.nanos()
        let c = try listener.accept(key: try makeKey(), local: secondaryHello(), admit: { _ in nil }, timeout: .milliseconds(50))
        #expect(c == nil)
        let ms = elapsedMillis(since: start)
        #expect(ms >= 45 && ms < 1000)
    }

    @Test func closeWakesABlockedAccept() throws {
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        let accepted = acceptInBackground(listener, key: try makeKey(), timeout: .seconds(30))
        Monotonic.sleep(nanos: 30_000_000)
        let start = Monotonic.nanos()
        listener.close()
        let result = try #require(accepted.wait(seconds: 5))
        #expect(elapsedMillis(since: start) < 1000)
        guard case .failure(let error) = result else {
            Issue.record("accept on a closed listener returned \(result)")
            return
        }
        #expect(error.message.contains("is closed"))
    }

    /// Review finding M1: clients that connect, send part of a hello and stall must not keep
    /// the primary out. One handshake at a time made each of them hold the port for the whole
    /// handshake timeout (20 of them: 40 s); now they authenticate side by side, the oldest
    /// cut off when all slots are taken.
    @Test func stallingClientsDoNotKeepThePrimaryOut() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let accepting = Background { () -> FramedConnection? in
            let until = Monotonic.nanos() + 20_000_000_000
            while Monotonic.nanos() < until {
                if let c = try? listener.accept(key: key, local: secondaryHello(), admit: { _ in nil }, timeout: .milliseconds(200)) {
                    return c
                }
            }
            return nil
        }
        var stalled: [Int32] = []
        defer { stalled.forEach { close($0) } }
        for _ in 0..<20 {
            let fd = try rawConnect(port: listener.port)
            rawSend(fd, Array("GMNS".utf8))
            stalled.append(fd)
        }
        Monotonic.sleep(nanos: 100_000_000)
        let start = Monotonic.nanos()
        let client = try TCPDialer.connect(host: "127.0.0.1", port: listener.port, key: key, local: primaryHello(), timeout: .seconds(5))
        defer { client.close() }
        #expect(elapsedMillis(since: start) < 1000)
        let server = try #require(accepting.wait(seconds: 10) ?? nil)
        server.close()
    }

    @Test func localhostAndIPv6Work() throws {
        let key = try makeKey()
        let listener = try TCPListener(host: "localhost", port: 0)
        defer { listener.close() }
        let accepted = acceptInBackground(listener, key: key)
        let c = try TCPDialer.connect(host: "localhost", port: listener.port, key: key, local: primaryHello(), timeout: .seconds(5))
        c.close()
        let result = try #require(accepted.wait())
        try #require(try result.get()).close()

        // Only where the host has IPv6 loopback.
        guard let v6 = try? TCPListener(host: "[::1]", port: 0) else { return }
        defer { v6.close() }
        let accepted6 = acceptInBackground(v6, key: key)
        let c6 = try TCPDialer.connect(host: "[::1]", port: v6.port, key: key, local: primaryHello(), timeout: .seconds(5))
        #expect(c6.remoteAddress == "[::1]:\(v6.port)")
        c6.close()
        let result6 = try #require(accepted6.wait())
        try #require(try result6.get()).close()
    }
}
