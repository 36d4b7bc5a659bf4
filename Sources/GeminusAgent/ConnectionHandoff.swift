import Foundation
import GeminusTransport

/// Hands a connection made on a background thread (dialing or accepting, which can take a
/// while) to the agent's loop, which must never wait on the network. Holds at most one: a newer
/// connection replaces, and closes, one the loop has not taken yet.
final class ConnectionHandoff: @unchecked Sendable {
    private let condition = NSCondition()
    private var ready: FramedConnection?
    private var stopped = false
    /// Whether the loop wants a (new) connection; only the dialer waits on it.
    private var wanted = true

    /// Offers a connection to the loop; false (and the connection closed) once stopped.
    @discardableResult
    func offer(_ c: FramedConnection) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard !stopped else {
            c.close()
            return false
        }
        ready?.close()
        ready = c
        wanted = false
        return true
    }

    func take() -> FramedConnection? {
        condition.lock()
        defer { condition.unlock() }
        let c = ready
        ready = nil
        return c
    }

    /// The loop lost its connection and wants another.
    func request() {
        condition.lock()
        wanted = true
        condition.broadcast()
        condition.unlock()
    }

    /// Blocks until a connection is wanted; false once stopped.
    func waitUntilWanted() -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while !wanted && !stopped { condition.wait() }
        return !stopped
    }

    func stop() {
        condition.lock()
        stopped = true
        ready?.close()
        ready = nil
        condition.broadcast()
        condition.unlock()
    }

    var isStopped: Bool {
        condition.lock()
        defer { condition.unlock() }
        return stopped
    }
}
