import GeminusCore

/// Corosync's node id (`nodelist.node.N.nodeid`): a positive 32-bit number, unique in a cluster.
public typealias ClusterNodeID = UInt32

/// One node of the cluster as its members see it.
public struct ClusterNode: Sendable, Hashable, Codable, Comparable, CustomStringConvertible {
    public var id: ClusterNodeID
    public var name: String

    public init(id: ClusterNodeID, name: String) {
        self.id = id
        self.name = name
    }

    /// By id: the order every member computes the same way (the coordinator is the lowest).
    public static func < (a: ClusterNode, b: ClusterNode) -> Bool { a.id < b.id }
    public var description: String { name }
}

/// Why a node left the group, as Corosync tells it.
public enum ClusterLeaveReason: String, Sendable, Codable {
    /// The node's process left the group on purpose (clean shutdown).
    case left
    /// The node's process died, its Corosync still runs (the node may still run VMs).
    case processDown = "process-down"
    /// Corosync lost the node (power, network, its Corosync died).
    case nodeDown = "node-down"
    /// This view is a merge of several changes, or Corosync gave no reason.
    case unknown
}

/// One membership change: the whole member list after it, and who joined or left.
/// `members` alone is enough to act on; `joined` and `left` say what happened.
public struct ClusterMembership: Sendable, Equatable {
    public var members: [ClusterNode]
    public var joined: [ClusterNode]
    public var left: [ClusterDeparture]

    public init(members: [ClusterNode], joined: [ClusterNode] = [], left: [ClusterDeparture] = []) {
        self.members = members.sorted()
        self.joined = joined.sorted()
        self.left = left.sorted { $0.node < $1.node }
    }
}

public struct ClusterDeparture: Sendable, Equatable {
    public var node: ClusterNode
    public var reason: ClusterLeaveReason
    public init(node: ClusterNode, reason: ClusterLeaveReason) {
        self.node = node
        self.reason = reason
    }
}

/// Whether this node's partition holds quorum, and since when (monotonic milliseconds from
/// the cluster's clock: `Monotonic` for Corosync, the simulated clock in simulation).
///
/// `memberIDs` is the quorum service's view: the nodes whose Corosync is in this partition (a
/// node whose Geminus process died but whose Corosync runs stays in it). Corosync reports it
/// separately from the CPG membership and in no fixed order with it, so a consumer that acts on
/// a node's departure should wait until the node is gone from this view too.
public struct QuorumState: Sendable, Equatable, CustomStringConvertible {
    public var quorate: Bool
    public var changedAtMillis: UInt64
    public var memberIDs: [ClusterNodeID]

    public init(quorate: Bool, changedAtMillis: UInt64, memberIDs: [ClusterNodeID] = []) {
        self.quorate = quorate
        self.changedAtMillis = changedAtMillis
        self.memberIDs = memberIDs.sorted()
    }

    public var description: String { quorate ? "quorate" : "not quorate" }
}

public enum ClusterEvent: Sendable, Equatable {
    case membership(ClusterMembership)
    case quorum(QuorumState)
    /// A node's latest published state (this node's own too, in the same agreed order as
    /// everyone else sees it). Only the latest per node matters: older ones may be coalesced.
    case published(from: ClusterNode, state: [UInt8])
}

/// Counters of what the bounded event queue had to do.
public struct ClusterStats: Sendable, Equatable {
    /// Events merged into a later one of the same kind (an older published state of the same
    /// node, or a membership/quorum change superseded while the queue was full).
    public var coalescedEvents: Int = 0
    /// Publishes that had to wait for Corosync's flow control.
    public var publishRetries: Int = 0
    public init() {}
}

/// The cluster seam: membership, quorum and one published state per node, in an order every
/// member agrees on. Two implementations: `CorosyncCluster` (Corosync's cpg, quorum and cmap
/// libraries) and `SimulatedCluster` (deterministic, for scenario tests).
///
/// Calls block the calling thread for at most their bound; use them from a thread.
public protocol Cluster: AnyObject, Sendable {
    /// This node, as the other members name it.
    var localNode: ClusterNode { get }
    /// The membership and quorum as of the last event returned by `nextEvent`.
    var quorum: QuorumState { get }
    /// The next event, waiting at most `timeoutMillis`; nil when none came. Throws when the
    /// connection to the cluster is gone (then the node must consider itself outside it).
    func nextEvent(timeoutMillis: Int) throws -> ClusterEvent?
    /// Publishes this node's state to every member (itself included); replaces the previous one.
    func publish(_ state: [UInt8]) throws
    var stats: ClusterStats { get }
    /// Leaves the cluster; later calls throw.
    func close()
}

public enum ClusterLimits {
    /// Largest published state: CPG carries up to about 1 MiB, and a bigger per-node state means
    /// a design problem, not a reason to fragment.
    public static let publishMaxBytes = 512 * 1024
    /// Events waiting to be read before the queue coalesces.
    public static let eventQueueLimit = 256
    /// Corosync's own limit on group members (CPG_MEMBERS_MAX).
    public static let membersMax = 128
}
