import Foundation
import GeminusCore

/// Machine-readable agent events, one JSON object per line on standard output, for `geminus
/// demo`, scripts and tests. People read the swift-log lines on standard error instead.
public final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private let enabled: Bool
    private let role: String

    public init(enabled: Bool, role: String) {
        self.enabled = enabled
        self.role = role
    }

    public func emit(_ type: String, _ fields: [String: Any] = [:]) {
        guard enabled else { return }
        var object = fields
        object["event"] = type
        object["role"] = role
        object["timeMicros"] = WallClock.micros()
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
        lock.lock()
        defer { lock.unlock() }
        FileHandle.standardOutput.write(data + Data([10]))
    }
}
