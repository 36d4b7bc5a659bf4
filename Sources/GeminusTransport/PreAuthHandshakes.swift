#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GeminusCore

/// Handshakes of the listening side that have not authenticated yet, each on its own thread.
///
/// One handshake at a time on the accepting thread let any client that connects and stalls
/// hold the port for a whole handshake timeout, again and again, keeping the primary from
/// reconnecting after a blip (review finding M1). Here at most `limit` run at once and, when
/// a new connection finds them all busy, the oldest is cut off: a stalling client must now
/// outrun the primary's whole handshake (well under a millisecond on a LAN) with `limit`
/// fresh connections to keep it out.
final class PreAuthHandshakes: @unchecked Sendable {
    typealias Result = Swift.Result<Handshake.Authenticated, GeminusError>

    let limit: Int
    private let condition = MonotonicCondition()
    private var running: [Int: (socket: Socket, remote: String)] = [:]
    private var nextID = 0
    private var results = Fifo<(remote: String, result: Result)>()
    private var resultCount = 0
    private var closed = false
    /// Wakes an `accept` waiting in poll when a handshake ends: [read end, write end].
    let wakeFDs: [Int32]

    init(limit: Int) {
        self.limit = max(1, limit)
        var fds: [Int32] = [-1, -1]
        let made = fds.withUnsafeMutableBufferPointer { pipe($0.baseAddress!) }
        precondition(made == 0, "cannot create a pipe: errno \(errno)")
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        wakeFDs = fds
    }

    deinit {
        for fd in wakeFDs { Glibc.close(fd) }
    }

    /// Starts authenticating `client` on a new thread; returns the remote address of a
    /// handshake that was cut off to make room, if one was.
    func start(_ client: Socket, remote: String, work: @escaping @Sendable () -> Result) -> String? {
        let (id, evicted): (Int?, String?) = condition.withLock {
            guard !closed else { return (nil, nil) }
            var evicted: String?
            if running.count >= limit, let oldest = running.keys.min(), let victim = running[oldest] {
                // Shut down, not released: the victim's thread still owns its socket and ends
                // with an error it reports like any failed handshake.
                victim.socket.shutdown()
                evicted = victim.remote
            }
            nextID += 1
            client.retain()
            running[nextID] = (client, remote)
            return (nextID, evicted)
        }
        guard let id else {
            client.release()
            return nil
        }
        let thread = Thread { [self] in
            let result = work()
            finished(id, result)
        }
        thread.name = "geminus-auth"
        thread.start()
        return evicted
    }

    private func finished(_ id: Int, _ result: Result) {
        let keep: Bool = condition.withLock {
            guard let entry = running.removeValue(forKey: id) else { return false }
            entry.socket.release()
            // Bounded like everything else: more finished handshakes than can be running
            // means nobody is accepting; the surplus is dropped (and its peer retries).
            guard !closed, resultCount < limit else { return false }
            results.push((entry.remote, result))
            resultCount += 1
            condition.broadcast()
            return true
        }
        if keep {
            var one: UInt8 = 1
            _ = write(wakeFDs[1], &one, 1)
        } else if case .success(let a) = result {
            a.release()
        }
    }

    /// The next finished handshake, if any.
    func take() -> (remote: String, result: Result)? {
        condition.withLock {
            guard let r = results.pop() else { return nil }
            resultCount -= 1
            return r
        }
    }

    /// Empties the wake pipe (called after poll said it is readable).
    func drainWake() {
        var sink = [UInt8](repeating: 0, count: 64)
        while sink.withUnsafeMutableBytes({ read(wakeFDs[0], $0.baseAddress, $0.count) }) > 0 {}
    }

    /// Cuts off every running handshake and drops finished ones.
    func close() {
        let dropped: [Result] = condition.withLock {
            closed = true
            for (_, r) in running { r.socket.shutdown() }
            var out: [Result] = []
            while let r = results.pop() { out.append(r.result) }
            resultCount = 0
            return out
        }
        for case .success(let a) in dropped { a.release() }
    }
}
