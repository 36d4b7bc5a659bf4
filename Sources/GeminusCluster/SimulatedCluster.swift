import Foundation
import GeminusCore

/// A deterministic cluster for tests: the nodes of a corosync.conf, each either up or down and
/// in a network partition. A partition with more than half of the configured nodes is quorate,
/// as votequorum with one vote per node decides. Events are delivered synchronously into each
/// member's bounded queue, in one order for everyone in a partition (CPG's agreed order).
/// Time is the simulation's: `nowMillis`, advanced by the test.
public final class SimulatedCluster: @unchecked Sendable {
    public let nodes: [ClusterNode]
    private let lock = NSLock()
    private var up: [ClusterNodeID: SimulatedClusterMember] = [:]
    private var partition: [ClusterNodeID: Int] = [:]
    private var nextPartition = 1
    private var _nowMillis: UInt64 = 0

    public init(nodes: [ClusterNode]) {
        precondition(Set(nodes.map(\.id)).count == nodes.count, "node ids must be unique")
        precondition(nodes.count <= ClusterLimits.membersMax)
        self.nodes = nodes.sorted()
        for n in nodes { partition[n.id] = 0 }
    }

    public var nowMillis: UInt64 {
        get { lock.withLock { _nowMillis } }
        set { lock.withLock { _nowMillis = newValue } }
    }

    public func node(named name: String) -> ClusterNode? { nodes.first { $0.name == name } }

    /// The node's process joins (its Corosync starts with it). Returns its handle on the seam.
    public func join(_ node: ClusterNode) -> SimulatedClusterMember {
        let member = SimulatedClusterMember(cluster: self, node: node)
        let affected: [ClusterNodeID] = lock.withLock {
            precondition(up[node.id] == nil, "\(node.name) joined twice")
            up[node.id] = member
            return membersLocked(partitionOf: node.id)
        }
        announce(affected, joined: [node], left: [])
        return member
    }

    /// The node dies: power off (its process, its Corosync and its VMs are gone).
    public func fail(_ node: ClusterNode, reason: ClusterLeaveReason = .nodeDown) {
        let affected: [ClusterNodeID]? = lock.withLock {
            guard let m = up.removeValue(forKey: node.id) else { return nil }
            m.queue.fail(GeminusError(.connectionFailed, "\(node.name) is down"))
            return membersLocked(partitionOf: node.id)
        }
        if let affected { announce(affected, joined: [], left: [ClusterDeparture(node: node, reason: reason)]) }
    }

    /// Cuts `node` off from everyone else (its process and VMs keep running).
    public func isolate(_ node: ClusterNode) {
        move(node, to: lock.withLock { defer { nextPartition += 1 }; return nextPartition })
    }

    /// Puts `node` back into the main partition.
    public func reconnect(_ node: ClusterNode) { move(node, to: 0) }

    private func move(_ node: ClusterNode, to target: Int) {
        let (before, after): ([ClusterNodeID], [ClusterNodeID]) = lock.withLock {
            let b = membersLocked(partitionOf: node.id).filter { $0 != node.id }
            partition[node.id] = target
            let a = membersLocked(partitionOf: node.id).filter { $0 != node.id }
            return (b, a)
        }
        guard before != after else { return }
        // Both sides see the change; the moved node sees its new partition.
        if !before.isEmpty { announce(before, joined: [], left: [ClusterDeparture(node: node, reason: .nodeDown)]) }
        let joinedNodes = nodes.filter { after.contains($0.id) }
        announce(after + [node.id], joined: joinedNodes + [node], left: nodes.filter { before.contains($0.id) }.map { ClusterDeparture(node: $0, reason: .nodeDown) }, only: [node.id])
        if !after.isEmpty { announce(after + [node.id], joined: [node], left: [], only: after) }
    }

    /// Up nodes in the partition of `id` (whether or not `id` itself is up).
    private func membersLocked(partitionOf id: ClusterNodeID) -> [ClusterNodeID] {
        let p = partition[id] ?? 0
        return nodes.map(\.id).filter { up[$0] != nil && partition[$0] == p }
    }

    private func announce(_ ids: [ClusterNodeID], joined: [ClusterNode], left: [ClusterDeparture], only: [ClusterNodeID]? = nil) {
        let (targets, members, quorate, now): ([SimulatedClusterMember], [ClusterNode], Bool, UInt64) = lock.withLock {
            let ids = Array(Set(ids)).sorted()
            let members = nodes.filter { ids.contains($0.id) && up[$0.id] != nil }
            let targets = (only ?? ids).compactMap { up[$0] }
            return (targets, members, members.count * 2 > nodes.count, _nowMillis)
        }
        // Membership first, then quorum: the order that needs care from consumers (Corosync
        // gives either).
        for t in targets {
            t.queue.push(.membership(ClusterMembership(members: members, joined: joined, left: left.filter { $0.node.id != t.localNode.id })))
            t.setQuorum(quorate, view: members.map(\.id), now: now)
        }
    }

    fileprivate func publish(from member: SimulatedClusterMember, _ state: [UInt8]) throws {
        let targets: [SimulatedClusterMember] = try lock.withLock {
            guard up[member.localNode.id] === member else {
                throw GeminusError(.connectionFailed, "\(member.localNode.name) is not in the cluster")
            }
            return membersLocked(partitionOf: member.localNode.id).compactMap { up[$0] }
        }
        for t in targets { t.queue.push(.published(from: member.localNode, state: state)) }
    }
}

/// One node's handle on a `SimulatedCluster`. `nextEvent` never waits: simulated time only
/// moves when the test moves it.
public final class SimulatedClusterMember: Cluster, @unchecked Sendable {
    public let localNode: ClusterNode
    private unowned let cluster: SimulatedCluster
    fileprivate let queue = ClusterEventQueue()
    private let lock = NSLock()
    private var _quorum = QuorumState(quorate: false, changedAtMillis: 0)
    private var closed = false
    private var quorumSeen = false

    fileprivate init(cluster: SimulatedCluster, node: ClusterNode) {
        self.cluster = cluster
        self.localNode = node
    }

    public var quorum: QuorumState { lock.withLock { _quorum } }
    public var stats: ClusterStats { queue.stats }

    fileprivate func setQuorum(_ quorate: Bool, view: [ClusterNodeID], now: UInt64) {
        let state: QuorumState? = lock.withLock {
            guard _quorum.quorate != quorate || _quorum.memberIDs != view.sorted() || !quorumSeen else { return nil }
            let changed = !quorumSeen || _quorum.quorate != quorate
            quorumSeen = true
            _quorum = QuorumState(quorate: quorate, changedAtMillis: changed ? now : _quorum.changedAtMillis, memberIDs: view)
            return _quorum
        }
        if let state { queue.push(.quorum(state)) }
    }

    public func nextEvent(timeoutMillis: Int) throws -> ClusterEvent? {
        try queue.pop(timeoutMillis: 0)
    }

    public func publish(_ state: [UInt8]) throws {
        guard state.count <= ClusterLimits.publishMaxBytes else {
            throw GeminusError(.resourceExhausted, "published state of \(state.count) bytes exceeds the \(ClusterLimits.publishMaxBytes)-byte limit")
        }
        guard !lock.withLock({ closed }) else { throw GeminusError(.connectionFailed, "closed") }
        try cluster.publish(from: self, state)
    }

    public func close() {
        lock.withLock { closed = true }
        cluster.fail(localNode, reason: .left)
    }
}
