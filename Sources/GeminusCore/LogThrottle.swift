/// Decides whether a repeated warning is worth another log line: a message is logged when it
/// differs from the last one, or when `intervalNanos` have passed since it was last logged,
/// with the count of repeats left out meanwhile. A peer retrying a doomed connection five
/// times a second must not bury everything else in the log.
public struct LogThrottle: Sendable {
    public let intervalNanos: UInt64
    private var lastKey: String?
    private var lastLoggedNanos: UInt64 = 0
    private var suppressed = 0

    public init(intervalNanos: UInt64 = 10_000_000_000) {
        self.intervalNanos = intervalNanos
    }

    /// nil: stay quiet. Otherwise log, mentioning the returned number of repeats left out.
    public mutating func admit(_ key: String, nowNanos: UInt64) -> Int? {
        if key == lastKey && nowNanos - lastLoggedNanos < intervalNanos {
            suppressed += 1
            return nil
        }
        let repeats = key == lastKey ? suppressed : 0
        lastKey = key
        lastLoggedNanos = nowNanos
        suppressed = 0
        return repeats
    }
}
