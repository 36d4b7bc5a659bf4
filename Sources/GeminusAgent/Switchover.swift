import Foundation
import GeminusCore

/// What a planned switchover came to, as `geminus failover` reports it.
public struct SwitchoverResult: Sendable, Equatable {
    public var ok: Bool
    public var message: String
    /// The final checkpoint the secondary resumed from.
    public var epoch: Epoch?
    /// The generation the secondary runs the VM as (nil when its confirmation was lost).
    public var generation: Generation?
    /// From pausing the guest for the final capture to the secondary's confirmation: the
    /// longest the guest can have stood still.
    public var guestPausedMicros: UInt64?

    public init(ok: Bool, message: String, epoch: Epoch? = nil, generation: Generation? = nil, guestPausedMicros: UInt64? = nil) {
        self.ok = ok
        self.message = message
        self.epoch = epoch
        self.generation = generation
        self.guestPausedMicros = guestPausedMicros
    }

    public var json: [String: Any] {
        var d: [String: Any] = ["ok": ok, "message": message]
        if let epoch { d["epoch"] = epoch.rawValue }
        if let generation { d["generation"] = generation.rawValue }
        if let guestPausedMicros { d["guestPausedMicros"] = guestPausedMicros }
        return d
    }
}

/// One switchover request at a time, handed from the control socket's thread to the agent's
/// loop, and its result handed back.
final class SwitchoverMailbox: @unchecked Sendable {
    private let lock = NSCondition()
    private var requested = false
    private var inProgress = false
    private var result: SwitchoverResult?

    /// Blocks until the loop finishes the switchover or `timeout` passes.
    func request(timeout: Duration) -> SwitchoverResult {
        lock.lock()
        defer { lock.unlock() }
        guard !requested && !inProgress else {
            return SwitchoverResult(ok: false, message: "a switchover is already under way")
        }
        requested = true
        result = nil
        let deadline = Date().addingTimeInterval(Double(timeout.components.seconds) + Double(timeout.components.attoseconds) / 1e18)
        while result == nil {
            if !lock.wait(until: deadline) { break }
        }
        if let r = result {
            result = nil
            return r
        }
        // The loop may still finish it; a later request is refused until then.
        return SwitchoverResult(ok: false, message: "no outcome within \(timeout); see the agent's log and `geminus status`")
    }

    /// The loop takes the request (once).
    func takeRequest() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard requested else { return false }
        requested = false
        inProgress = true
        return true
    }

    /// The loop reports the outcome; ignored when no switchover is under way.
    func finish(_ r: SwitchoverResult) {
        lock.lock()
        defer { lock.unlock() }
        guard inProgress || requested else { return }
        inProgress = false
        requested = false
        result = r
        lock.broadcast()
    }
}
