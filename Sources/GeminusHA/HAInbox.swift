import Dispatch
import Foundation

/// The bounded queue between an HA node's producers (the cluster reader, the host scanner, one
/// thread per fence or start) and the one thread that drives the node.
///
/// When full, a waiting scan gives way first: scans are periodic and the next says all an older
/// one said. Anything else must be handled (a lost fence result would leave its node waiting for
/// ever), so its producer waits for room instead; the producers are few and bounded, and the
/// consumer never pushes, so it always makes room. Both are counted and reported to the node as
/// an `.inboxOverflow` input: a full inbox means a stuck loop, which the operator must hear of.
public final class HAInbox: @unchecked Sendable {
    public struct Overflow: Codable, Sendable, Equatable {
        /// Scans dropped for a newer input.
        public var scansSuperseded = 0
        /// Inputs whose producer had to wait for room.
        public var producerWaits = 0
        public init() {}
    }

    public let limit: Int
    private let cond = NSCondition()
    private var items: [HAInput] = []
    private var overflow = Overflow()
    private var reported = Overflow()
    /// Wakes the consumer; a semaphore because its timed wait runs on the monotonic clock.
    private let wakeup = DispatchSemaphore(value: 0)

    public init(limit: Int = 1024) {
        precondition(limit >= 2)
        self.limit = limit
    }

    public var overflowSoFar: Overflow { cond.withLock { overflow } }
    public var count: Int { cond.withLock { items.count } }

    /// Adds an input; when full, drops a waiting scan, or else waits for room (see above).
    public func push(_ input: HAInput) {
        cond.withLock {
            var waited = false
            while items.count >= limit {
                if let i = items.firstIndex(where: { if case .scan = $0 { return true }; return false }) {
                    items.remove(at: i)
                    overflow.scansSuperseded += 1
                    break
                }
                if !waited { waited = true; overflow.producerWaits += 1 }
                cond.wait()
            }
            items.append(input)
        }
        wakeup.signal()
    }

    /// The next input, or nil; never waits. A new overflow is reported before the inputs.
    public func pop() -> HAInput? {
        cond.withLock {
            if overflow != reported {
                reported = overflow
                return .inboxOverflow(overflow)
            }
            guard !items.isEmpty else { return nil }
            cond.broadcast()
            return items.removeFirst()
        }
    }

    /// Waits until an input is there, at most `timeoutMillis`.
    public func wait(timeoutMillis: Int) {
        let deadline = DispatchTime.now() + .milliseconds(max(0, timeoutMillis))
        while count == 0 {
            if wakeup.wait(timeout: deadline) == .timedOut { return }
        }
    }
}
