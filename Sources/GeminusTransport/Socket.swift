#if canImport(Glibc)
import Glibc
#endif
import GeminusCore
import Synchronization

/// One TCP socket descriptor, shared by the threads of a connection.
///
/// Closing a descriptor while another thread is blocked on it is a race (the number can be
/// reused by an unrelated `open` before the blocked call returns), so a connection never
/// closes it directly: `shutdown()` wakes every blocked call, and the descriptor is closed
/// only when the last user calls `release()`.
final class Socket: @unchecked Sendable {
    let fd: Int32
    private struct State {
        var users = 1
        var isShutDown = false
    }
    private let state = Mutex(State())

    init(fd: Int32) {
        self.fd = fd
    }

    deinit {
        // Only reached if a user forgot to release; closing here keeps descriptors from leaking.
        state.withLock { s in
            if s.users > 0 { Glibc.close(fd) }
        }
    }

    func retain() {
        state.withLock { $0.users += 1 }
    }

    /// For users that may race with `shutdown()`: once shut down, the descriptor may already
    /// be closed, and must not be used again.
    func retainIfOpen() -> Bool {
        state.withLock { s in
            guard !s.isShutDown, s.users > 0 else { return false }
            s.users += 1
            return true
        }
    }

    func release() {
        let last = state.withLock { s -> Bool in
            s.users -= 1
            return s.users == 0
        }
        if last { Glibc.close(fd) }
    }

    /// Wakes blocked reads and writes (they return EOF / EPIPE) and sends FIN; once only,
    /// because after the last `release()` the number may belong to someone else.
    func shutdown() {
        state.withLock { s in
            guard !s.isShutDown, s.users > 0 else { return }
            s.isShutDown = true
            _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
        }
    }

    func setNoDelay() {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }


    func waitUntil(_ events: Int16, deadlineNanos: UInt64) -> IOResult {
        pollDescriptor(fd, events, deadlineNanos: deadlineNanos)
    }

    /// Reads whatever is available (at least one byte) before the deadline.
    func receive(into buffer: UnsafeMutableRawBufferPointer, deadlineNanos: UInt64) -> IOResult {
        while true {
            let n = recv(fd, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT))
            if n > 0 { return .done(n) }
            if n == 0 { return .endOfStream }
            let e = errno
            if e == EINTR { continue }
            guard e == EAGAIN || e == EWOULDBLOCK else { return .failed(e) }
            let w = waitUntil(Int16(POLLIN), deadlineNanos: deadlineNanos)
            guard case .done = w else { return w }
        }
    }

    /// Writes all of `bytes` before the deadline; for the handshake's few small frames.
    func sendAll(_ bytes: [UInt8], deadlineNanos: UInt64) -> IOResult {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            }
            if n >= 0 {
                offset += n
                continue
            }
            let e = errno
            if e == EINTR { continue }
            guard e == EAGAIN || e == EWOULDBLOCK else { return .failed(e) }
            let w = waitUntil(Int16(POLLOUT), deadlineNanos: deadlineNanos)
            guard case .done = w else { return w }
        }
        return .done(offset)
    }

    static func describe(errno e: Int32) -> String {
        String(cString: strerror(e))
    }
}

enum IOResult: Equatable {
    case done(Int)
    case endOfStream
    case timedOut
    case failed(Int32)
}

/// Waits (bounded by `deadlineNanos`) until `fd` has one of `events`; `.done(revents)`.
func pollDescriptor(_ fd: Int32, _ events: Int16, deadlineNanos: UInt64) -> IOResult {
    while true {
        let now = Monotonic.nanos()
        if now >= deadlineNanos { return .timedOut }
        let remainingMillis = (deadlineNanos - now + 999_999) / 1_000_000
        var p = pollfd(fd: fd, events: events, revents: 0)
        let r = poll(&p, 1, Int32(clamping: remainingMillis))
        if r > 0 { return .done(Int(p.revents)) }
        if r < 0 && errno != EINTR { return .failed(errno) }
    }
}
