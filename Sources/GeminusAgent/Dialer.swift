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
    private let condition = NSCondition()
    private var ready: FramedConnection?
    private var wanted = true
    private var stopped = false
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

    func take() -> FramedConnection? {
        condition.lock()
        defer { condition.unlock() }
        let c = ready
        ready = nil
        return c
    }

    /// The loop lost its connection: dial again.
    func reconnect() {
        condition.lock()
        wanted = true
        condition.broadcast()
        condition.unlock()
    }

    func stop() {
        condition.lock()
        stopped = true
        ready?.close()
        ready = nil
        condition.broadcast()
        condition.unlock()
    }

    private func loop() {
        var lastError = ""
        while true {
            condition.lock()
            while !wanted && !stopped { condition.wait() }
            if stopped { condition.unlock(); return }
            condition.unlock()
            do {
                let c = try TCPDialer.connect(host: host, port: port, key: key, local: hello, timeout: .seconds(2), logger: logger)
                condition.lock()
                if stopped { condition.unlock(); c.close(); return }
                ready = c
                wanted = false
                condition.unlock()
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
