import Foundation
import GeminusCore

/// The bounded queue between a cluster's dispatch (Corosync's thread, or the simulation) and
/// the reader. Published states are latest-wins per node, so an older one still queued is
/// dropped when a newer one arrives: the queue then holds at most one per node. When it is
/// still full, a membership or quorum change is merged into the last queued one of its kind
/// (the member list after both, the union of who joined and left), so nothing a reader must
/// act on is lost and memory stays bounded.
public final class ClusterEventQueue: @unchecked Sendable {
    private let lock = NSCondition()
    private var events: [ClusterEvent] = []
    private var failure: GeminusError?
    private var _stats = ClusterStats()
    public let limit: Int

    public init(limit: Int = ClusterLimits.eventQueueLimit) {
        precondition(limit >= 4, "the queue must hold at least one event of each kind")
        self.limit = limit
    }

    public var stats: ClusterStats { lock.withLock { _stats } }
    public var count: Int { lock.withLock { events.count } }

    public func push(_ event: ClusterEvent) {
        lock.withLock {
            if case .published(let from, _) = event,
               let i = events.firstIndex(where: { if case .published(let f, _) = $0 { return f.id == from.id }; return false }) {
                events.remove(at: i)
                _stats.coalescedEvents += 1
            }
            if events.count >= limit {
                coalesce(with: event)
            } else {
                events.append(event)
            }
            lock.signal()
        }
    }

    private func coalesce(with event: ClusterEvent) {
        switch event {
        case .membership(let m):
            if let i = events.lastIndex(where: { if case .membership = $0 { return true }; return false }),
               case .membership(let old) = events[i] {
                events.remove(at: i)
                var merged = ClusterMembership(members: m.members, joined: old.joined + m.joined, left: old.left + m.left)
                merged.left = merged.left.map { ClusterDeparture(node: $0.node, reason: .unknown) }
                events.append(.membership(merged))
                _stats.coalescedEvents += 1
                return
            }
        case .quorum:
            if let i = events.lastIndex(where: { if case .quorum = $0 { return true }; return false }) {
                events.remove(at: i)
                events.append(event)
                _stats.coalescedEvents += 1
                return
            }
        case .published:
            break
        }
        // Full of other kinds only (more distinct nodes than the limit): a programming error,
        // because the cluster never has more members than ClusterLimits.membersMax.
        assertionFailure("cluster event queue full with \(events.count) events of other kinds")
        events.append(event)
    }

    /// Marks the cluster connection lost: readers get this error once the queue is drained.
    public func fail(_ error: GeminusError) {
        lock.withLock {
            if failure == nil { failure = error }
            lock.broadcast()
        }
    }

    public func pop(timeoutMillis: Int) throws -> ClusterEvent? {
        let deadline = Date().addingTimeInterval(Double(max(0, timeoutMillis)) / 1000)
        lock.lock()
        defer { lock.unlock() }
        while events.isEmpty && failure == nil {
            if !lock.wait(until: deadline) { break }
        }
        if !events.isEmpty { return events.removeFirst() }
        if let failure { throw failure }
        return nil
    }

    func noteRetry() { lock.withLock { _stats.publishRetries += 1 } }
}
