#if canImport(Glibc)
import Glibc
#endif
import GeminusCore

/// A mutex and condition variable whose timed waits run on CLOCK_MONOTONIC. `NSCondition`
/// waits until a `Date`, so a wall-clock step (NTP, an operator) would stretch or cut every
/// send and receive timeout; a failover system must not let that happen.
final class MonotonicCondition: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }

    /// Waits until signalled or until the monotonic clock reaches `deadlineNanos`; the caller
    /// holds the lock and re-checks its predicate (wake-ups may be spurious).
    func wait(untilNanos deadlineNanos: UInt64) {
        if deadlineNanos == .max {
            pthread_cond_wait(cond, mutex)
            return
        }
        var ts = timespec(tv_sec: Int(deadlineNanos / 1_000_000_000), tv_nsec: Int(deadlineNanos % 1_000_000_000))
        _ = pthread_cond_timedwait(cond, mutex, &ts)
    }

    func signal() { pthread_cond_signal(cond) }
    func broadcast() { pthread_cond_broadcast(cond) }
}

extension Duration {
    /// Whole nanoseconds, clamped to 0...UInt64.max so that `.seconds(Int64.max)` means "forever".
    var clampedNanos: UInt64 {
        let (seconds, attoseconds) = components
        if seconds < 0 || (seconds == 0 && attoseconds <= 0) { return 0 }
        let (s, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return .max }
        let (total, overflow2) = s.addingReportingOverflow(UInt64(attoseconds / 1_000_000_000))
        return overflow2 ? .max : total
    }

    /// The monotonic instant this long from now; `.max` for durations too long to matter.
    var deadlineFromNow: UInt64 {
        let (d, overflow) = Monotonic.nanos().addingReportingOverflow(clampedNanos)
        return overflow ? .max : d
    }

    var millisDescription: String {
        let n = clampedNanos
        return n % 1_000_000 == 0 ? "\(n / 1_000_000) ms" : "\(Double(n) / 1e6) ms"
    }
}
