import GeminusCluster
import GeminusCore

/// What this node's hypervisor runs, as one scan of it found.
public struct HostScan: Sendable, Equatable {
    /// The HA and CA VMs of this node that run (other domains are not reported).
    public var vms: [VMReport]
    /// RAM this node offers to VMs.
    public var ramTotalMiB: Int
    /// RAM given to every domain of this node that runs, HA, CA or neither.
    public var ramCommittedMiB: Int

    public init(vms: [VMReport], ramTotalMiB: Int, ramCommittedMiB: Int) {
        self.vms = vms
        self.ramTotalMiB = ramTotalMiB
        self.ramCommittedMiB = ramCommittedMiB
    }
}

/// One input of an HA node, raw, as its environment received it: the node decodes and judges.
public enum HAInput: Sendable, Equatable {
    /// From the cluster seam; a published state is still bytes (the node decodes it).
    case cluster(ClusterEvent)
    /// The connection to the cluster is gone: from now on this node is outside it.
    case clusterLost(GeminusError)
    case scan(HostScan)
    /// The fence agent for `node` finished: `confirmed` only when it confirmed the node is off.
    case fenceDone(node: String, confirmed: Bool, detail: String)
    /// A start asked for by `HAEnvironment.start` finished.
    case startDone(vm: String, ok: Bool, detail: String)
    /// An operator asks to mark `node` a spare (N+1) or an ordinary node; the node checks it.
    case spareRequest(node: String, on: Bool)
    /// The environment's bounded inbox hit its limit since the last report (totals so far).
    case inboxOverflow(HAInbox.Overflow)
}

/// Everything an HA node needs from the world, and no more. Two implementations: the real host
/// (`GeminusHAHost.HAHostEnvironment`: Corosync, libvirt, fence agents, the status file) and the
/// scenario tests' simulated cluster (`HAWorld`), so the same `HANode` runs in both.
///
/// Called from the thread that drives the node only. Slow work (fence agents, libvirt starts)
/// is started by `fence` and `start` and answered later as an input, so that the node keeps
/// answering the cluster meanwhile; only the self-fence `stop` is synchronous, because nothing
/// else matters more once quorum is gone.
public protocol HAEnvironment: AnyObject {
    /// Monotonic milliseconds, on the clock of the cluster's `QuorumState.changedAtMillis`. The
    /// node's only notion of time: every retry and deadline is measured on it.
    var nowMillis: UInt64 { get }
    /// The next input that is waiting, or nil; never waits. The cluster's events, the host's
    /// scans, the outcomes of fences and starts and the operator's requests all arrive here, in
    /// one order, so the node handles them one at a time like the state machine it drives.
    func nextInput() -> HAInput?
    /// Publishes this node's state to every member of the cluster (this node included).
    func publish(_ state: [UInt8]) throws
    /// Runs the fence agent for `node`; answer with `.fenceDone`.
    func fence(node: String)
    /// Starts `vm` on this host from its published definition; answer with `.startDone`.
    func start(_ vm: VMReport)
    /// Self-fence: stops the VM at once, before returning; throws when it cannot.
    func stop(vm: String) throws
    /// One line of this node's log.
    func log(_ level: HALogLevel, _ text: String)
    /// The cluster as this node sees it, for the operator's commands (`geminus ha status`).
    func publishStatus(_ status: HAStatus)
}

/// The cluster as one node's HA agent sees it: what `geminus ha status` shows.
public struct HAStatus: Codable, Sendable, Equatable {
    public struct Member: Codable, Sendable, Equatable {
        public var name: String
        public var id: UInt32
        public var spare: Bool
        public var ramTotalMiB: Int?
        public var ramFreeMiB: Int?
        public var vms: [VMReport]

        public init(name: String, id: UInt32, spare: Bool, ramTotalMiB: Int?, ramFreeMiB: Int?, vms: [VMReport]) {
            self.name = name
            self.id = id
            self.spare = spare
            self.ramTotalMiB = ramTotalMiB
            self.ramFreeMiB = ramFreeMiB
            self.vms = vms
        }
    }

    public var node: String
    public var nodeID: UInt32
    public var quorate: Bool
    public var quorumChangedAgoMillis: UInt64
    public var coordinator: String?
    public var members: [Member]
    public var fenced: [String]
    public var recovery: [RecoveryEntry]
    /// How often the agent's inbox was full (zero in a healthy agent; nil from a writer that
    /// does not count it).
    public var inboxOverflow: HAInbox.Overflow?

    public init(node: String, nodeID: UInt32, quorate: Bool, quorumChangedAgoMillis: UInt64, coordinator: String?, members: [Member],
                fenced: [String], recovery: [RecoveryEntry], inboxOverflow: HAInbox.Overflow?) {
        self.node = node
        self.nodeID = nodeID
        self.quorate = quorate
        self.quorumChangedAgoMillis = quorumChangedAgoMillis
        self.coordinator = coordinator
        self.members = members
        self.fenced = fenced
        self.recovery = recovery
        self.inboxOverflow = inboxOverflow
    }
}

/// One node of the HA path: the `HAManager` driven through an `HAEnvironment`. It decodes the
/// cluster's events, judges operator requests, steps the manager and carries out its actions.
/// Single-threaded and step-driven: it never waits, sleeps or starts a thread; whoever drives it
/// (the `geminus ha agent` loop, or the scenario world) calls `step()` when inputs wait or time
/// has passed.
public final class HANode {
    public let env: any HAEnvironment
    public private(set) var manager: HAManager
    /// How often the status for the operator is refreshed.
    public var statusIntervalMillis: UInt64 = 200
    /// Most inputs handled by one `drain`, so that a flood of them cannot starve `tick`.
    public static let inputsPerDrainMax = 4096
    /// Set once the cluster connection is lost; every later `drain` throws it.
    public private(set) var lost: GeminusError?
    public private(set) var inboxOverflow = HAInbox.Overflow()
    private var quorumChangedAtMillis: UInt64 = 0
    private var statusAtMillis: UInt64?

    public init(node: ClusterNode, config: HAConfig, env: any HAEnvironment) {
        self.env = env
        self.manager = HAManager(node: node, config: config)
    }

    public var config: HAConfig {
        get { manager.config }
        set { manager.config = newValue }
    }

    /// One turn: the inputs that wait, then the passage of time.
    public func step() throws {
        try drain()
        tick()
    }

    /// Handles the waiting inputs in order; returns how many. Throws once the cluster is lost.
    @discardableResult
    public func drain() throws -> Int {
        var n = 0
        while n < Self.inputsPerDrainMax {
            if let lost { throw lost }
            guard let input = env.nextInput() else { break }
            n += 1
            try handle(input)
        }
        return n
    }

    /// Time passed: retries and deadlines that are due, and the operator's status.
    public func tick() {
        perform(manager.handle(.tick, nowMillis: env.nowMillis))
        let now = env.nowMillis
        if statusAtMillis.map({ now &- $0 >= statusIntervalMillis }) ?? true {
            statusAtMillis = now
            env.publishStatus(status)
        }
    }

    public func handle(_ input: HAInput) throws {
        let now = env.nowMillis
        switch input {
        case .cluster(.membership(let m)):
            perform(manager.handle(.membership(m), nowMillis: now))
        case .cluster(.quorum(let q)):
            quorumChangedAtMillis = q.changedAtMillis
            perform(manager.handle(.quorum(q), nowMillis: now))
        case .cluster(.published(let from, let bytes)):
            // A state that does not parse is another release's or another program's: it must not
            // stop this node, and the sender's next good state replaces it.
            do { perform(manager.handle(.report(from: from, try NodeReport.decode(bytes)), nowMillis: now)) } catch {
                env.log(.warning, "ignored a state from \(from.name): \(error)")
            }
        case .clusterLost(let e):
            // Outside the cluster now: behave as a node without quorum, say so, then stop.
            env.log(.error, "\(e.message); \(e.fix ?? "")")
            quorumChangedAtMillis = now
            perform(manager.handle(.quorum(QuorumState(quorate: false, changedAtMillis: now)), nowMillis: now))
            statusAtMillis = now
            env.publishStatus(status)
            lost = e
            throw e
        case .scan(let s):
            // Free RAM as committed, not as the kernel's MemAvailable: a guest touches its RAM
            // lazily, so MemAvailable would promise room that its VMs already own.
            perform(manager.handle(.localScan(vms: s.vms.sorted { $0.name < $1.name }, ramTotalMiB: s.ramTotalMiB,
                                              ramFreeMiB: s.ramTotalMiB - s.ramCommittedMiB), nowMillis: now))
        case .fenceDone(let node, let confirmed, let detail):
            perform(manager.handle(.fenceDone(node: node, confirmed: confirmed, detail: detail), nowMillis: now))
        case .startDone(let vm, let ok, let detail):
            perform(manager.handle(.startDone(vm: vm, ok: ok, detail: detail), nowMillis: now))
        case .spareRequest(let node, let on):
            // Settings change only in a quorate partition (its members agree on them), and only
            // for a node the cluster knows.
            guard manager.quorate, manager.members.contains(where: { $0.name == node }) else {
                env.log(.warning, "refused: spare \(node) \(on ? "on" : "off") (not quorate, or no such member)")
                return
            }
            perform(manager.handle(.setSpare(node: node, on: on), nowMillis: now))
        case .inboxOverflow(let o):
            inboxOverflow = o
            env.log(.warning, "inbox full: \(o.scansSuperseded) scans superseded, \(o.producerWaits) inputs waited for room so far")
        }
    }

    private func perform(_ actions: [HAAction]) {
        for a in actions {
            switch a {
            case .log(let level, let text):
                env.log(level, text)
            case .publish(let r):
                do { try env.publish(r.encoded()) } catch { env.log(.error, "cannot publish this node's state: \(error)") }
            case .fence(let node):
                env.fence(node: node)
            case .start(let vm):
                env.start(vm)
            case .stop(let names):
                // Self-fence: at once, one VM after another; a stuck hypervisor is bounded by the
                // environment's own timeout.
                for n in names {
                    do {
                        try env.stop(vm: n)
                        env.log(.warning, "stopped \(n) (self-fence)")
                    } catch {
                        env.log(.error, "SELF-FENCE: cannot stop \(n): \(error); this host must be powered off by its fence agent")
                    }
                }
            }
        }
    }

    /// The cluster as this node sees it (published VM definitions left out: they are large and
    /// the operator does not read them here).
    public var status: HAStatus {
        let m = manager
        let members = m.members.map { n -> HAStatus.Member in
            let r = n == m.node ? m.report : m.reports[n.name]
            return HAStatus.Member(name: n.name, id: n.id, spare: m.settings.spares.contains(n.name), ramTotalMiB: r?.ramTotalMiB,
                                   ramFreeMiB: r?.ramFreeMiB, vms: (r?.vms ?? []).map { var v = $0; v.definition = nil; return v })
        }
        return HAStatus(node: m.node.name, nodeID: m.node.id, quorate: m.quorate,
                        quorumChangedAgoMillis: env.nowMillis &- quorumChangedAtMillis,
                        coordinator: m.coordinator?.name, members: members, fenced: m.table.fenced,
                        recovery: m.table.entries.map { var e = $0; e.vm.definition = nil; return e }, inboxOverflow: inboxOverflow)
    }
}
