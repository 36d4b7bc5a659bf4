import Foundation
import GeminusCore
import GeminusTransport
import Logging

/// Keeps trying to reach the secondary on a background thread, so a slow or absent peer never
/// stalls the epoch loop; the loop picks the connection up with `take()`.
final class Dialer: @unchecked Sendable {
    private let host: String
    private let port: UInt16
    private let key: PairKey
    private let hello: PeerHello
    private let logger: Logger
    private let handoff = ConnectionHandoff()
    static let retryMillis = 200

    init(host: String, port: UInt16, key: PairKey, hello: PeerHello, logger: Logger) {
        self.host = host
        self.port = port
        self.key = key
        self.hello = hello
        self.logger = logger
    }

    func start() {
        let t = Thread { [self] in loop() }
        t.name = "geminus-dialer"
        t.start()
    }

    func take() -> FramedConnection? { handoff.take() }

    /// The loop lost its connection: dial again.
    func reconnect() { handoff.request() }

    func stop() { handoff.stop() }

    private func loop() {
        var lastError = ""
        while handoff.waitUntilWanted() {
            do {
                let c = try TCPDialer.connect(host: host, port: port, key: key, local: hello, timeout: .seconds(2), logger: logger)
                guard handoff.offer(c) else { return }
                lastError = ""
            } catch {
                // Say it once per distinct failure: a secondary that is down for an hour must
                // not flood the log, but a change (refused -> wrong key) must show.
                let text = "\(error)"
                if text != lastError {
                    logger.warning("cannot reach secondary \(host):\(port): \(text); retrying every \(Self.retryMillis) ms")
                    lastError = text
                }
                Monotonic.sleep(nanos: UInt64(Self.retryMillis) * 1_000_000)
            }
        }
    }
}
