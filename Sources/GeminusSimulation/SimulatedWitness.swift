import GeminusCore
import GeminusReplication

/// The pair's witness engine as the simulator models it: a three-node Corosync cluster (the
/// primary's host, the secondary's host, the witness host) with votequorum, and the witness
/// keeping its `WitnessRecord` of the VM. The arbitration logic it feeds is the real one
/// (`PrimaryLease`, `PrimaryMachine`, `SecondaryMachine`); this is only the world around it.
///
/// What it models, from Corosync's behaviour (../shared/notes/corosync.md):
/// - a membership is a set of hosts that can all talk to each other (Corosync's ring needs every
///   pair): with one link of the three cut, the host with both links ends up with one side or the
///   other, drawn at random;
/// - a node's membership follows the true connectivity late: each new partition installs its
///   membership at one moment drawn in `detectNanos` after the change, independently of the
///   other partition, so for a while a cut-off node still believes in the old one (stale quorum);
/// - quorate means two of the three nodes in the installed membership;
/// - messages travel only between nodes that are truly connected and have each other in their
///   installed membership (a broken ring delivers nothing), after `deliveryNanos`;
/// - the witness publishes its record after each membership it installs and after each change
///   to the record; a node has "heard" the witness only from such a publication in its current
///   membership;
/// - a frozen host's Corosync is frozen too: the others lose it, and it notices nothing until it thaws;
/// - a self-fenced primary's host stays in the cluster (its Corosync runs on); its agent tells
///   the witness that its generation stopped, again after every membership change of its host
///   (the agent stays fenced: `stayFenced`); the secondary, in one membership
///   with it, hears that word directly too, with the newest record the primary had heard;
/// - a node that can receive but not send (one-way loss) cannot finish a new membership for a
///   long while (`oneWayGatherNanos`: 4.2 s measured with token 300), so it goes on calling
///   itself quorate while the other side installs its own and wins;
/// - a node's own messages are delivered only while its installed ring is intact and not
///   reforming (the agents' ring lease watches that: `ringWorks`).
struct SimulatedWitness {
    enum Node: Int, CaseIterable, Comparable, CustomStringConvertible {
        case primary, secondary, witness
        static func < (a: Node, b: Node) -> Bool { a.rawValue < b.rawValue }
        var description: String { ["primary", "secondary", "witness"][rawValue] }
    }

    struct Timings: Equatable, Sendable {
        /// From a connectivity change to the new membership being installed (token + consensus).
        var detectNanos: ClosedRange<UInt64>
        var deliveryNanos: UInt64
        /// Added to the membership install of a node that cannot send.
        var oneWayGatherNanos: ClosedRange<UInt64> = 0...700_000_000
    }

    let timings: Timings
    /// Which host pairs can talk (both directions: Corosync's ring breaks on one-way loss too).
    private var cut: Set<[Node]> = []
    /// Hosts whose Corosync runs (not crashed, not frozen).
    private var running: Set<Node> = Set(Node.allCases)
    /// Hosts whose packets to another are lost while they still hear it (one-way loss).
    private var cannotSend: Set<Node> = []
    /// Nodes that can send again: a late gather of theirs ends in the normal time from now.
    private var sendingAgain: Set<Node> = []
    private(set) var installed: [Node: Set<Node>] = [:]
    private var pendingInstall: [Node: (members: Set<Node>, atNanos: UInt64)] = [:]
    private var heard: [Node: Bool] = [:]
    private var heardRecord: [Node: WitnessRecord] = [:]
    /// What the witness holds.
    private(set) var record: WitnessRecord?
    private(set) var stopped: Generation?
    private var heardStopped: [Node: Generation] = [:]
    /// A self-fenced primary's stop notice, said after every membership change, with the newest
    /// record the primary had heard (it can only have released under one of those).
    private var stopNotice: Generation?
    private var primaryHeardRecord: WitnessRecord?
    private var peerStop: [Node: (generation: Generation, record: WitnessRecord?)] = [:]
    private var deliveries: [(atNanos: UInt64, to: Node, what: Delivery)] = []
    private var partitions: [Set<Node>] = [Set(Node.allCases)]
    private var partitionsKey = ""
    /// A cut or a host's state was touched since the partitions were last checked.
    private var connectivityTouched = true

    private var connectivityKey: String {
        Node.allCases.map { running.contains($0) ? "1" : "0" }.joined() + cut.map { "\($0)" }.sorted().joined()
    }

    private enum Delivery {
        case announcement(WitnessRecord)
        case stopAnnouncement(Generation)
        case peerStop(Generation, WitnessRecord?)
        case witnessRecord(WitnessRecord?, stopped: Generation?)
    }

    init(timings: Timings) {
        self.timings = timings
        for n in Node.allCases {
            installed[n] = Set(Node.allCases)
            heard[n] = true
        }
    }

    func view(of n: Node) -> WitnessView {
        let members = installed[n] ?? [n]
        let peer: Node = n == .primary ? .secondary : .primary
        return WitnessView(quorate: members.count >= 2, peerPresent: members.contains(peer), witnessHeard: heard[n] ?? false,
                           witnessRecord: heardRecord[n], witnessStopped: heardStopped[n], peerStop: peerStop[n])
    }

    mutating func setCut(_ a: Node, _ b: Node, _ isCut: Bool) {
        let key = [a, b].sorted()
        if isCut { cut.insert(key) } else { cut.remove(key) }
        connectivityTouched = true
    }

    func isCut(_ a: Node, _ b: Node) -> Bool { cut.contains([a, b].sorted()) }

    mutating func setCannotSend(_ n: Node, _ on: Bool) {
        if on {
            cannotSend.insert(n)
        } else if cannotSend.remove(n) != nil {
            sendingAgain.insert(n)
        }
    }

    /// Whether the cluster delivers `n`'s own messages now: its Corosync runs, its installed
    /// ring is intact (every member reachable, with the same membership) and not reforming.
    func ringWorks(_ n: Node) -> Bool {
        guard running.contains(n), pendingInstall[n] == nil, let members = installed[n] else { return false }
        return members.allSatisfy { connected(n, $0) && installed[$0] == members && pendingInstall[$0] == nil }
    }

    /// The secondary's host can form the quorate partition with the witness for sure: their link
    /// works, and the primary's host (which stays in the cluster after a self-fence) does not
    /// hold the witness on a link the secondary lacks. In that non-transitive cut Corosync
    /// gives the witness to one side, or (as measured in Tools/ca-partition-test) settles
    /// nothing until the cut heals, so no takeover time can be promised.
    var secondaryCanHoldTheWitness: Bool {
        // (A secondary that cannot send cannot finish a membership either.)
        !isCut(.secondary, .witness) && !cannotSend.contains(.secondary)
            && !(running.contains(.primary) && !isCut(.primary, .witness) && isCut(.primary, .secondary))
    }

    /// A host stopped (crash, freeze) or runs again. A host that comes back after a crash starts
    /// with only itself in its membership.
    mutating func setRunning(_ n: Node, _ isRunning: Bool, fresh: Bool = false) {
        if isRunning { running.insert(n) } else { running.remove(n) }
        connectivityTouched = true
        if isRunning && fresh {
            installed[n] = [n]
            heard[n] = false
            heardRecord[n] = nil
            heardStopped[n] = nil
            peerStop[n] = nil
            pendingInstall[n] = nil
        }
    }

    private func connected(_ a: Node, _ b: Node) -> Bool {
        a == b || (running.contains(a) && running.contains(b) && !isCut(a, b))
    }

    /// The partitions the hosts truly form now: disjoint sets of hosts that all talk to each
    /// other. `tieBreak` picks the side a host with links to both sides joins.
    private func truePartitions(tieBreak: UInt64) -> [Set<Node>] {
        let all = Node.allCases.filter { running.contains($0) }
        if all.allSatisfy({ a in all.allSatisfy { connected(a, $0) } }) { return [Set(all)] }
        // A node that cannot send ends up alone (as measured: the one-way-cut node installed a
        // membership of itself, the other two theirs).
        let pairs = all.indices.flatMap { i in all[(i + 1)...].map { [all[i], $0] } }
            .filter { connected($0[0], $0[1]) && !cannotSend.contains($0[0]) && !cannotSend.contains($0[1]) }
        guard !pairs.isEmpty else { return all.map { [$0] } }
        let pair = Set(pairs[Int(tieBreak % UInt64(pairs.count))])
        return [pair] + all.filter { !pair.contains($0) }.map { [$0] }
    }

    /// Announcement from `from`: reaches the witness only over a working ring.
    mutating func announce(from: Node, _ r: WitnessRecord, now: UInt64) {
        guard canTalk(from, .witness) else { return }
        deliveries.append((now + timings.deliveryNanos, .witness, .announcement(r)))
    }

    /// The self-fenced primary's agent: "generation `g` stopped its guest for good".
    mutating func announceStopped(_ g: Generation, now: UInt64) {
        stopNotice = g
        sayStop(now: now)
    }

    private mutating func sayStop(now: UInt64) {
        guard let g = stopNotice else { return }
        if canTalk(.primary, .witness) { deliveries.append((now + timings.deliveryNanos, .witness, .stopAnnouncement(g))) }
        if canTalk(.primary, .secondary) { deliveries.append((now + timings.deliveryNanos, .secondary, .peerStop(g, primaryHeardRecord))) }
    }

    private func canTalk(_ a: Node, _ b: Node) -> Bool {
        connected(a, b) && (installed[a]?.contains(b) ?? false) && (installed[b]?.contains(a) ?? false)
    }

    private mutating func publishRecord(now: UInt64) {
        for n in [Node.primary, .secondary] where canTalk(.witness, n) {
            deliveries.append((now + timings.deliveryNanos, n, .witnessRecord(record, stopped: stopped)))
        }
    }

    /// Advances to `now`; returns the nodes whose view changed.
    mutating func advance(now: UInt64, rng: inout SimulationRandom) -> Set<Node> {
        var changed = Set<Node>()
        // New memberships to install: one moment per true partition. The partitions are drawn
        // again only when connectivity changes (looked at only when something touched it).
        if connectivityTouched {
            connectivityTouched = false
            let key = connectivityKey
            if key != partitionsKey {
                partitionsKey = key
                partitions = truePartitions(tieBreak: rng.next())
            }
        }
        for n in sendingAgain.sorted() {
            if let p = pendingInstall[n] { pendingInstall[n] = (p.members, min(p.atNanos, now + rng.uniform(timings.detectNanos))) }
        }
        sendingAgain = []
        for component in partitions {
            guard let n = component.first else { continue }
            let target = pendingInstall[n]?.members ?? installed[n]
            guard target != component || component.contains(where: { (pendingInstall[$0]?.members ?? installed[$0]) != component }) else { continue }
            let at = now + rng.uniform(timings.detectNanos)
            for m in component {
                let late = cannotSend.contains(m) ? rng.uniform(timings.oneWayGatherNanos) : 0
                pendingInstall[m] = (component, at + late)
            }
        }
        for n in Node.allCases where running.contains(n) {
            guard let p = pendingInstall[n], p.atNanos <= now else { continue }
            pendingInstall[n] = nil
            installed[n] = p.members
            heard[n] = false
            heardRecord[n] = nil
            heardStopped[n] = nil
            peerStop[n] = nil
            changed.insert(n)
            if n == .witness { publishRecord(now: now) }
        }
        // The witness republishes after every membership change; a node that installs after it
        // (a late gather) gets it then.
        if !changed.contains(.witness) {
            for n in changed where canTalk(.witness, n) {
                deliveries.append((now + timings.deliveryNanos, n, .witnessRecord(record, stopped: stopped)))
            }
        }
        // After every install of this step (the others' may follow the primary's in it).
        if !changed.isEmpty { sayStop(now: now) }
        // Deliveries due, to hosts that run and still share a working ring with the sender.
        // Publications made while handling these are queued afresh (they arrive later).
        let queued = deliveries
        deliveries = []
        for d in queued {
            guard d.atNanos <= now else { deliveries.append(d); continue }
            switch d.what {
            case .announcement(let r):
                guard running.contains(.witness) else { continue }
                let merged = record.map { $0.merged(with: r) } ?? r
                if merged != record {
                    record = merged
                    publishRecord(now: now)
                }
            case .stopAnnouncement(let g):
                guard running.contains(.witness), canTalk(.primary, .witness) else { continue }
                if stopped.map({ g > $0 }) ?? true {
                    stopped = g
                    publishRecord(now: now)
                }
            case .peerStop(let g, let r):
                guard canTalk(.primary, .secondary) else { continue }
                peerStop[.secondary] = (g, r)
                changed.insert(.secondary)
            case .witnessRecord(let r, let s):
                guard canTalk(.witness, d.to) else { continue }
                heard[d.to] = true
                heardRecord[d.to] = r
                heardStopped[d.to] = s
                if d.to == .primary, let r { primaryHeardRecord = primaryHeardRecord.map { $0.merged(with: r) } ?? r }
                changed.insert(d.to)
            }
        }
        return changed
    }
}

extension PairSimulator {
    /// Moves the modelled cluster on and publishes each changed view to the node that sees it
    /// (through its witness link, as the agents' cluster glue does); the primary's lease sees it
    /// at once, as the fence watch's thread would.
    func stepWitness() {
        guard var w = witness else { return }
        let changed = w.advance(now: now, rng: &witnessRandom)
        witness = w
        let sw = w.secondaryCanHoldTheWitness && secondary != nil
        if !sw { secondaryWithWitnessSinceNanos = nil } else if secondaryWithWitnessSinceNanos == nil { secondaryWithWitnessSinceNanos = now }
        if changed.contains(.primary), let p = primary, !p.isFrozen, let link = p.witnessLink {
            let view = w.view(of: .primary)
            link.view = (view, (link.view?.version ?? 0) + 1)
            if let lease = p.lease { _ = leaseActions(lease.lease.handle(.view(view, nowNanos: now)), p) }
        }
        if changed.contains(.secondary), let s = secondary, s.resumed == nil, let link = s.witnessLink {
            link.view = (w.view(of: .secondary), (link.view?.version ?? 0) + 1)
        }
    }

    /// Heals one host's link to the witness (scenarios).
    func healWitnessLink(fromPrimary: Bool) {
        guard witness != nil else { return }
        let node: SimulatedWitness.Node = fromPrimary ? .primary : .secondary
        witness?.setCut(node, .witness, false)
        note("world", "heal \(node) witness", notable: true)
    }

    /// The fence watch's tick; true when the primary fenced itself.
    func tickLease(_ p: SimPrimaryHost) -> Bool {
        guard let l = p.lease else { return false }
        // The agent republishes every 100 ms; scaled to this cluster's timings, every 10 ms.
        if let w = witness, w.ringWorks(.primary), now % 10_000_000 == 0 { _ = l.lease.handle(.ownDelivery(atNanos: now)) }
        return leaseActions(l.lease.handle(.tick(nowNanos: now)), p)
    }

    /// A self-fence runs the node's own procedure (held output dropped, guest stopped for good,
    /// the witness told); the host's Corosync runs on, but nothing of its guest does.
    func leaseActions(_ actions: [PrimaryLease.Action], _ p: SimPrimaryHost) -> Bool {
        for case .selfFence(let reason) in actions {
            guard p.isAlive else { return true }
            count("self-fence")
            p.node?.selfFence(reason: reason)
            p.isAlive = false
            if primary === p { primary = nil }
            lostPrimary()
            return true
        }
        return false
    }
}
