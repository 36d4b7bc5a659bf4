import Foundation
import GeminusCore
import GeminusNode

/// Machine-readable agent events, one JSON object per line on standard output, for `geminus
/// demo`, scripts and tests. People read the swift-log lines on standard error instead.
public final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private let enabled: Bool
    private var role: String

    public init(enabled: Bool, role: String) {
        self.enabled = enabled
        self.role = role
    }

    /// The role events are tagged with from now on (a switchover swaps roles).
    public func setRole(_ r: String) {
        lock.withLock { role = r }
    }

    /// A node's event (those with a name; the log says the rest).
    public func emit(_ event: NodeEvent) {
        guard let name = event.name else { return }
        emit(name, event.fields.mapValues(\.any))
    }

    public func emit(_ name: EventName, _ fields: [String: Any] = [:]) {
        guard enabled else { return }
        let type = name.rawValue
        lock.lock()
        defer { lock.unlock() }
        var object = fields
        object["event"] = type
        object["role"] = role
        object["timeMicros"] = WallClock.micros()
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
        FileHandle.standardOutput.write(data + Data([10]))
    }
}
