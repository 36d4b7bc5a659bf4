import Foundation
import GeminusCluster
import GeminusCore

/// What kind of protection a VM has. CA VMs are reported (they use RAM and count as VMs on their
/// node) but restarted by their own pair, never by the HA path.
public enum VMKind: String, Codable, Sendable {
    case ha, ca
}

public enum VMRunState: String, Codable, Sendable {
    case running
    /// Being started on this node after a recovery: counts as placed here.
    case starting
}

/// One VM as its node reports it.
public struct VMReport: Codable, Equatable, Sendable {
    public var name: String
    public var ramMiB: Int
    public var kind: VMKind
    /// Higher is restarted first; equal priorities go biggest first.
    public var priority: Int
    public var state: VMRunState
    /// The libvirt definition (XML) another node starts it from; HA VMs only. Disks are on
    /// shared storage, so the definition is all a surviving node needs.
    public var definition: String?

    public init(name: String, ramMiB: Int, kind: VMKind = .ha, priority: Int = 0, state: VMRunState = .running, definition: String? = nil) {
        self.name = name
        self.ramMiB = ramMiB
        self.kind = kind
        self.priority = priority
        self.state = state
        self.definition = definition
    }
}

/// Cluster-wide settings, replicated by "highest version wins" (ties: higher setter id): any
/// quorate node may change them, every node keeps the latest it has seen.
public struct HASettings: Codable, Equatable, Sendable {
    public var version: UInt64 = 0
    public var setBy: ClusterNodeID = 0
    /// Reserved (N+1) nodes: they take VMs only when no ordinary node can.
    public var spares: [String] = []

    public init() {}

    func newer(than other: HASettings) -> Bool {
        (version, setBy) > (other.version, other.setBy)
    }
}

/// A VM whose node failed, on its way back.
public struct RecoveryEntry: Codable, Equatable, Sendable {
    public enum Phase: String, Codable, Sendable {
        /// Its old node (or a node it was being started on) is not yet confirmed fenced (S4).
        case awaitingFence = "awaiting-fence"
        /// Fenced; waiting for a node with room ("recovery" in VMmanager's words).
        case recovery
        /// Told to start on `assignedTo`; done when that node reports it running.
        case assigned
    }

    public var vm: VMReport
    /// The node it last ran on.
    public var from: String
    /// Nodes that may still run it: all must be confirmed fenced before it starts elsewhere.
    public var mustFence: [String]
    public var phase: Phase
    public var assignedTo: String?
    /// Nodes that failed to start it (tried again only after every other node was tried).
    public var excluded: [String] = []
    /// Placement attempts that found no node.
    public var noFitAttempts: Int = 0
}

/// The coordinator's record of recoveries, published with its report; the other nodes adopt it,
/// so a new coordinator continues where the old one stopped.
public struct RecoveryTable: Codable, Equatable, Sendable {
    public var generation: UInt64 = 0
    /// Nodes confirmed fenced since they left (cleared when a node rejoins).
    public var fenced: [String] = []
    public var entries: [RecoveryEntry] = []
    public init() {}
}

/// One node's published state.
public struct NodeReport: Codable, Equatable, Sendable {
    public var ramTotalMiB: Int
    public var ramFreeMiB: Int
    public var vms: [VMReport]
    /// Recoveries assigned to this node that it could not start, with the reason.
    public var failedStarts: [String: String] = [:]
    /// HA VMs this node stopped itself when it lost quorum: the coordinator places them again
    /// (the node is alive and says they do not run, so no fence is needed for them).
    public var selfFenced: [VMReport]?
    public var settings: HASettings
    /// This node's copy of the recovery table: the coordinator's is the one the others adopt;
    /// a new coordinator after a join starts from the newest (highest generation) of them.
    public var recovery: RecoveryTable?

    public init(ramTotalMiB: Int, ramFreeMiB: Int, vms: [VMReport], settings: HASettings = HASettings(), recovery: RecoveryTable? = nil) {
        self.ramTotalMiB = ramTotalMiB
        self.ramFreeMiB = ramFreeMiB
        self.vms = vms
        self.settings = settings
        self.recovery = recovery
    }

    /// Version 1 of the wire form: JSON with sorted keys (readable in a capture, stable).
    public func encoded() -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return Array((try? e.encode(Envelope(v: 1, report: self))) ?? Data())
    }

    public static func decode(_ bytes: [UInt8]) throws -> NodeReport {
        do {
            let env = try JSONDecoder().decode(Envelope.self, from: Data(bytes))
            guard env.v == 1 else {
                throw GeminusError(.protocolMismatch, "a node publishes HA state version \(env.v); this Geminus reads version 1",
                                   fix: "run the same Geminus release on every node")
            }
            return env.report
        } catch let e as GeminusError {
            throw e
        } catch {
            throw GeminusError(.protocolMismatch, "an HA state published in the cluster does not parse: \(error)",
                               fix: "run the same Geminus release on every node; is another program in the CPG group?")
        }
    }

    struct Envelope: Codable {
        var v: Int
        var report: NodeReport
    }
}
