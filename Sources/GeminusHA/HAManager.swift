import GeminusCluster
import GeminusCore

/// Tunables of the HA path.
public struct HAConfig: Sendable, Equatable {
    /// A node may take VMs whose RAM exceeds its free RAM by this share of its total RAM.
    public var overcommitPercent: Int = 0
    /// Wait after a failed fence before trying again.
    public var fenceRetryMillis: UInt64 = 5_000
    /// Wait after a placement that found no node before trying again (a change in the cluster
    /// — a report, a member — tries at once).
    public var placementRetryMillis: UInt64 = 10_000
    /// Most recoveries tracked at once; more VMs than this on failed nodes means a configuration
    /// far outside what one cluster is meant to hold.
    public var recoveryEntriesMax: Int = 4096
    /// How long a node outside a quorate partition keeps its HA VMs before it stops them. The
    /// majority restarts them only after their node's fence agent confirms (S4), so this is not
    /// what keeps two copies apart; it is the Proxmox watchdog rule, with a grace so that a
    /// membership blip (an overloaded host missing tokens) does not stop healthy VMs.
    public var selfFenceAfterMillis: UInt64 = 5_000
    /// After a join, how long the coordinator waits for every member's fresh state before it
    /// acts without the missing ones.
    public var joinSyncMillis: UInt64 = 3_000

    public init(overcommitPercent: Int = 0, fenceRetryMillis: UInt64 = 5_000, placementRetryMillis: UInt64 = 10_000,
                selfFenceAfterMillis: UInt64 = 5_000) {
        precondition(overcommitPercent >= 0 && overcommitPercent <= 1000)
        self.overcommitPercent = overcommitPercent
        self.selfFenceAfterMillis = selfFenceAfterMillis
        self.fenceRetryMillis = fenceRetryMillis
        self.placementRetryMillis = placementRetryMillis
    }
}

/// Inputs of the HA state machine.
public enum HAEvent: Sendable, Equatable {
    case membership(ClusterMembership)
    case quorum(QuorumState)
    case report(from: ClusterNode, NodeReport)
    /// What this node's hypervisor runs now, and its RAM.
    case localScan(vms: [VMReport], ramTotalMiB: Int, ramFreeMiB: Int)
    /// The fence agent for `node` finished: `confirmed` only on its success (exit 0).
    case fenceDone(node: String, confirmed: Bool, detail: String)
    /// A start this machine asked for finished.
    case startDone(vm: String, ok: Bool, detail: String)
    /// An operator marks a node a spare (N+1) or ordinary. The caller checks that `node` is a
    /// member and that this node is quorate.
    case setSpare(node: String, on: Bool)
    /// Time passed (retries are due on ticks).
    case tick
}

public enum HALogLevel: String, Sendable {
    case info, warning, error
}

/// Outputs: what to do, which the caller performs and answers with an event.
public enum HAAction: Sendable, Equatable {
    case publish(NodeReport)
    /// Run the fence agent for `node`; answer with `.fenceDone`.
    case fence(node: String)
    /// Start `vm` on this node from its definition; answer with `.startDone`.
    case start(VMReport)
    /// Self-fence: stop these HA VMs at once (this node lost quorum).
    case stop(vms: [String])
    case log(HALogLevel, String)
}

/// The HA path of one node, without I/O: fed cluster events, its hypervisor's scans and the
/// outcomes of its fences and starts, it says what to publish, fence, start and stop.
///
/// Every node runs one. All of them keep the same recovery table (they see the same agreed
/// sequence of membership changes and reports), but only the coordinator — the lowest-id member
/// of a quorate partition — fences and places, and publishes the table the others adopt.
/// Only the node a VM is assigned to starts it. A node outside a quorate partition does nothing
/// but stop its own HA VMs.
public struct HAManager: Sendable {
    public let node: ClusterNode
    public var config: HAConfig

    public private(set) var members: [ClusterNode] = []
    public private(set) var quorate = false
    public private(set) var reports: [String: NodeReport] = [:]
    public private(set) var table = RecoveryTable()
    public private(set) var settings = HASettings()
    /// What this node's hypervisor runs (last scan, plus starts that succeeded since).
    public private(set) var localVMs: [VMReport] = []
    private var ramTotalMiB = 0
    private var ramFreeMiB = 0
    private var starting: [String: VMReport] = [:]
    private var failedStarts: [String: String] = [:]
    private var stopRequested: Set<String> = []
    /// HA VMs this node stopped on quorum loss, reported until the cluster has taken them over.
    private var selfFencedVMs: [VMReport] = []
    /// Self-fencing applies only after this node was part of a quorate partition: a daemon that
    /// starts before its cluster has formed must not stop the VMs the host already runs.
    private var everQuorate = false
    private var quorumLostAtMillis: UInt64 = 0
    private var selfFenceAnnounced = false
    /// The quorum service's view, and nodes that left CPG as down but are still in it: until
    /// both say the same, the coordinator does not act (CPG and quorum report a change
    /// separately; acting on CPG alone, a node cut off would take itself for a quorate majority).
    private var quorumView: Set<ClusterNodeID> = []
    private var downPending: Set<ClusterNodeID> = []
    public var viewsAgree: Bool {
        Set(members.map(\.id)).isSubset(of: quorumView) && downPending.isDisjoint(with: quorumView)
    }

    // Coordinator only (not published: a new coordinator starts them afresh).
    private var fenceInFlight: Set<String> = []
    private var fenceRetryAtMillis: [String: UInt64] = [:]
    private var nextPlacementAtMillis: UInt64 = 0
    private var actingCoordinator = false
    private var awaitingReportsFrom: Set<String> = []
    private var syncBest: RecoveryTable?
    /// Whether `table` is the current coordinator's (adopted since the last change of
    /// coordinator, join or quorum), so that its assignments may be acted on.
    private var tableCurrent = false
    private var awaitingSinceMillis: UInt64 = 0
    private var lastPublished: NodeReport?
    private var mustPublish = false

    public init(node: ClusterNode, config: HAConfig = HAConfig()) {
        self.node = node
        self.config = config
    }

    public var coordinator: ClusterNode? { quorate ? members.first : nil }
    public var isCoordinator: Bool { coordinator == node }
    public var isSpare: Bool { settings.spares.contains(node.name) }

    public mutating func handle(_ event: HAEvent, nowMillis: UInt64) -> [HAAction] {
        var out: [HAAction] = []
        switch event {
        case .membership(let m):
            let before = Set(members.map(\.name))
            let previousCoordinator = coordinator
            members = m.members
            for j in m.joined where j != node {
                // A node that comes back is alive again: it is no longer "fenced", and its next
                // report says what it runs.
                table.fenced.removeAll { $0 == j.name }
            }
            for j in m.joined { downPending.remove(j.id) }
            for d in m.left where d.reason == .nodeDown || d.reason == .unknown {
                if quorumView.contains(d.node.id) { downPending.insert(d.node.id) }
            }
            for d in m.left where before.contains(d.node.name) {
                out.append(.log(.warning, "node \(d.node.name) left the cluster (\(d.node.name == node.name ? "self" : d.reason.rawValue))"))
            }
            // A joiner needs everyone's state; CPG does not replay old messages. Until every
            // member's fresh state is in, the coordinator (perhaps the joiner, with a stale
            // table) does not act: then it continues from the newest table among them.
            if !m.joined.isEmpty || coordinator != previousCoordinator {
                // Until the (perhaps new) coordinator's table arrives, ours may be stale: a node
                // back from a partition must not act on assignments made before it left.
                tableCurrent = false
            }
            if !m.joined.isEmpty {
                mustPublish = true
                awaitingReportsFrom = Set(members.map(\.name)).subtracting([node.name])
                awaitingSinceMillis = nowMillis
            } else {
                awaitingReportsFrom.formIntersection(members.map(\.name))
            }
        case .quorum(let q):
            quorumView = Set(q.memberIDs)
            downPending.formIntersection(quorumView)
            if q.quorate != quorate {
                quorate = q.quorate
                if quorate { everQuorate = true } else { quorumLostAtMillis = nowMillis }
                tableCurrent = false
                out.append(.log(q.quorate ? .info : .error, q.quorate ? "quorum gained" : "quorum lost"))
                if quorate { mustPublish = true }
            }
        case .report(let from, let r):
            guard members.contains(from) else { break }
            let previous = reports[from.name]
            reports[from.name] = r
            if r.settings.newer(than: settings) { settings = r.settings }
            if !awaitingReportsFrom.isEmpty, let t = r.recovery, t.generation > (syncBest?.generation ?? 0) { syncBest = t }
            if awaitingReportsFrom.remove(from.name) != nil, awaitingReportsFrom.isEmpty {
                // The newest table of the members wins (a rejoined node's is older).
                if isCoordinator, let best = syncBest, best.generation > table.generation { adopt(best) }
                syncBest = nil
            }
            // Only a table at least as new as ours: a coordinator that just rejoined publishes
            // its old one until it has caught up, and its old assignments must not be acted on.
            if from == coordinator && from != node, let t = r.recovery, t.generation >= table.generation {
                adopt(t)
                tableCurrent = true
            }
            // Room may have changed: place at once. Not for a table change alone, which a
            // placement itself causes (that would retry a VM that fits nowhere in a loop).
            if previous?.capacityView != r.capacityView { nextPlacementAtMillis = min(nextPlacementAtMillis, nowMillis) }
        case .localScan(let vms, let total, let free):
            ramTotalMiB = total
            ramFreeMiB = free
            localVMs = vms
            stopRequested = stopRequested.intersection(vms.map(\.name))
        case .fenceDone(let n, let confirmed, let detail):
            fenceInFlight.remove(n)
            guard isCoordinator else { break }
            let waiting = table.entries.filter { $0.mustFence.contains(n) }.map(\.vm.name)
            if confirmed {
                if !table.fenced.contains(n) { table.fenced.append(n); table.fenced.sort() }
                table.generation += 1
                out.append(.log(.info, "fence of \(n) confirmed (\(detail))"))
            } else {
                fenceRetryAtMillis[n] = nowMillis + config.fenceRetryMillis
                out.append(.log(.error, "FENCE OF \(n) FAILED (\(detail)): \(list(waiting)) stay\(waiting.count == 1 ? "s" : "") down until \(n) is confirmed fenced; retrying in \(config.fenceRetryMillis / 1000) s"))
            }
        case .startDone(let vm, let ok, let detail):
            guard let v = starting[vm] else { break }
            if ok {
                starting[vm] = nil
                var running = v
                running.state = .running
                localVMs.removeAll { $0.name == vm }
                localVMs.append(running)
                // Until the next scan says so, its RAM is in use here.
                ramFreeMiB -= running.ramMiB
                out.append(.log(.info, "started \(vm)"))
            } else {
                starting[vm] = nil
                failedStarts[vm] = detail
                out.append(.log(.error, "cannot start \(vm): \(detail)"))
            }
        case .setSpare(let n, let on):
            var s = settings
            s.version += 1
            s.setBy = node.id
            s.spares.removeAll { $0 == n }
            if on { s.spares.append(n); s.spares.sort() }
            settings = s
            out.append(.log(.info, "node \(n) is \(on ? "a spare" : "an ordinary node") now"))
            nextPlacementAtMillis = 0
        case .tick:
            break
        }
        reconcile(nowMillis: nowMillis, &out)
        return out
    }

    // MARK: The steps

    /// Nodes whose last report lists HA VMs and that are no longer members: their VMs enter the
    /// table, to be fenced for. Every node does this (same inputs, same table), so a coordinator
    /// that dies mid-recovery leaves nothing behind.
    private mutating func detectFailures(_ out: inout [HAAction]) {
        guard quorate, members.contains(node) else { return }
        let memberNames = Set(members.map(\.name))
        let runningOnMembers = Set(members.flatMap { reports[$0.name]?.vms.map(\.name) ?? [] })
        var changed = false
        for (name, r) in reports.sorted(by: { $0.key < $1.key }) where !memberNames.contains(name) {
            var lost: [String] = []
            for v in r.vms where v.kind == .ha && !runningOnMembers.contains(v.name) {
                if let i = table.entries.firstIndex(where: { $0.vm.name == v.name }) {
                    if !table.entries[i].mustFence.contains(name) { table.entries[i].mustFence.append(name) }
                    continue
                }
                guard table.entries.count < config.recoveryEntriesMax else {
                    out.append(.log(.error, "recovery table full (\(config.recoveryEntriesMax) VMs): \(v.name) from \(name) not tracked"))
                    continue
                }
                var vm = v
                vm.state = .running
                table.entries.append(RecoveryEntry(vm: vm, from: name, mustFence: [name], phase: .awaitingFence))
                lost.append(v.name)
            }
            reports[name] = nil
            changed = true
            if !lost.isEmpty {
                out.append(.log(.warning, "\(list(lost)) on \(name) need\(lost.count == 1 ? "s" : "") a restart once \(name) is confirmed fenced"))
            }
        }
        // VMs a member stopped itself when it lost quorum: it is alive and says they do not
        // run, so they go straight to placement.
        for n in members {
            for v in reports[n.name]?.selfFenced ?? [] where !runningOnMembers.contains(v.name) && !table.entries.contains(where: { $0.vm.name == v.name }) {
                guard table.entries.count < config.recoveryEntriesMax else { break }
                table.entries.append(RecoveryEntry(vm: v, from: n.name, mustFence: [], phase: .recovery))
                out.append(.log(.warning, "\(v.name) was stopped by \(n.name) when it lost quorum: placing it again"))
                changed = true
                nextPlacementAtMillis = 0
            }
        }
        // A VM being started on a node that left may be running there: fence that node too.
        for i in table.entries.indices where table.entries[i].phase == .assigned {
            guard let t = table.entries[i].assignedTo, !memberNames.contains(t) else { continue }
            if !table.entries[i].mustFence.contains(t) { table.entries[i].mustFence.append(t) }
            table.entries[i].phase = .awaitingFence
            table.entries[i].assignedTo = nil
            out.append(.log(.warning, "\(table.entries[i].vm.name) was being started on \(t), which left: it waits for \(t) to be fenced"))
            changed = true
        }
        // Only the coordinator numbers tables: the others' copies then never look newer than
        // the coordinator's.
        if changed && isCoordinator { table.generation += 1 }
    }

    private mutating func reconcile(nowMillis now: UInt64, _ out: inout [HAAction]) {
        guard quorate, members.contains(node) else {
            actingCoordinator = false
            selfFence(nowMillis: now, &out)
            publishIfChanged(&out)
            return
        }
        selfFenceAnnounced = false
        guard viewsAgree else {
            publishIfChanged(&out)
            return
        }
        if isCoordinator != actingCoordinator {
            if isCoordinator { out.append(.log(.info, "coordinator now")) }
            // A coordinator starts its own attempts afresh; results of an earlier stint are stale.
            fenceInFlight = []
            fenceRetryAtMillis = [:]
            actingCoordinator = isCoordinator
        }
        if !awaitingReportsFrom.isEmpty && now >= awaitingSinceMillis + config.joinSyncMillis {
            // A member whose agent does not answer must not stall every recovery.
            out.append(.log(.warning, "no fresh state from \(awaitingReportsFrom.sorted().joined(separator: ", ")) within \(config.joinSyncMillis) ms of the join; continuing without it"))
            if isCoordinator, let best = syncBest, best.generation > table.generation { adopt(best) }
            awaitingReportsFrom = []
            syncBest = nil
        }
        detectFailures(&out)
        if !selfFencedVMs.isEmpty {
            // Handed over once the table tracks them or they run somewhere.
            let running = Set(members.flatMap { reports[$0.name]?.vms.map(\.name) ?? [] })
            selfFencedVMs.removeAll { v in running.contains(v.name) || table.entries.contains { $0.vm.name == v.name } }
        }
        if isCoordinator && awaitingReportsFrom.isEmpty {
            finish(&out)
            release(&out)
            fence(nowMillis: now, &out)
            release(&out)
            place(nowMillis: now, &out)
        }
        startAssigned(&out)
        publishIfChanged(&out)
    }

    /// Outside a quorate partition this node may already have been fenced for and its VMs be
    /// restarted elsewhere: stop them (as Proxmox's watchdog does, but without waiting).
    private mutating func selfFence(nowMillis now: UInt64, _ out: inout [HAAction]) {
        guard everQuorate else { return }
        let ha = (localVMs.filter { $0.kind == .ha }.map(\.name) + starting.keys.sorted()).filter { !stopRequested.contains($0) }
        guard !ha.isEmpty else { return }
        let deadline = quorumLostAtMillis + config.selfFenceAfterMillis
        guard now >= deadline else {
            if !selfFenceAnnounced {
                selfFenceAnnounced = true
                out.append(.log(.error, "no quorum: \(list(ha)) will be stopped in \(config.selfFenceAfterMillis) ms unless quorum returns"))
            }
            return
        }
        selfFenceAnnounced = false
        stopRequested.formUnion(ha)
        for v in localVMs where ha.contains(v.name) && v.kind == .ha && !selfFencedVMs.contains(where: { $0.name == v.name }) {
            selfFencedVMs.append(v)
        }
        for v in starting.values where !selfFencedVMs.contains(where: { $0.name == v.name }) {
            var r = v
            r.state = .running
            selfFencedVMs.append(r)
        }
        starting = [:]
        out.append(.log(.error, "no quorum: self-fencing, stopping \(list(ha))"))
        out.append(.stop(vms: ha))
        localVMs.removeAll { ha.contains($0.name) }
    }

    private mutating func fence(nowMillis now: UInt64, _ out: inout [HAAction]) {
        let needed = Set(table.entries.filter { $0.phase == .awaitingFence }.flatMap(\.mustFence)).subtracting(table.fenced)
        // Members are never fenced: a member's own report says what it runs (see release).
        let memberNames = Set(members.map(\.name))
        for n in needed.sorted() where !memberNames.contains(n) && !fenceInFlight.contains(n) && now >= fenceRetryAtMillis[n, default: 0] {
            fenceInFlight.insert(n)
            let waiting = table.entries.filter { $0.phase == .awaitingFence && $0.mustFence.contains(n) }.map(\.vm.name)
            out.append(.log(.info, "fencing \(n) (\(list(waiting)) wait\(waiting.count == 1 ? "s" : ""))"))
            out.append(.fence(node: n))
        }
    }

    /// Fenced everywhere it could run: the VM may start elsewhere.
    private mutating func release(_ out: inout [HAAction]) {
        let memberNames = Set(members.map(\.name))
        for i in table.entries.indices where table.entries[i].phase == .awaitingFence {
            // A node that is back in the cluster, whose fresh report does not list the VM, does
            // not run it (a VM it runs would have cancelled the recovery): no fence needed.
            let back = table.entries[i].mustFence.filter { memberNames.contains($0) && reports[$0] != nil && !awaitingReportsFrom.contains($0) }
            for n in back {
                table.entries[i].mustFence.removeAll { $0 == n }
                out.append(.log(.info, "\(n) is back and does not run \(table.entries[i].vm.name): no fence needed for it"))
            }
            if !back.isEmpty && table.entries[i].mustFence.isEmpty {
                table.entries[i].phase = .recovery
                table.generation += 1
                nextPlacementAtMillis = 0
                continue
            }
            if Set(table.entries[i].mustFence).isSubset(of: table.fenced) {
                table.entries[i].phase = .recovery
                table.generation += 1
                nextPlacementAtMillis = 0
            }
        }
    }

    /// Recovered when the node it was assigned to reports it running; back to recovery when
    /// that node could not start it.
    private mutating func finish(_ out: inout [HAAction]) {
        var done: [Int] = []
        for (i, e) in table.entries.enumerated() where e.phase != .assigned {
            // Its node came back still running it (a network blip), or an operator started it:
            // nothing to recover, and no fence needed for it.
            if let n = runningNode(of: e.vm.name) {
                out.append(.log(.warning, "\(e.vm.name) is running on \(n): its recovery is cancelled"))
                done.append(i)
            }
        }
        for (i, e) in table.entries.enumerated() where e.phase == .assigned {
            guard let t = e.assignedTo, let r = reports[t] else { continue }
            if r.vms.contains(where: { $0.name == e.vm.name && $0.state == .running }) {
                out.append(.log(.info, "\(e.vm.name) recovered: running on \(t) (was on \(e.from))"))
                done.append(i)
            } else if let why = r.failedStarts[e.vm.name] {
                table.entries[i].excluded.append(t)
                table.entries[i].phase = .recovery
                table.entries[i].assignedTo = nil
                table.generation += 1
                nextPlacementAtMillis = 0
                out.append(.log(.error, "\(t) could not start \(e.vm.name) (\(why)); placing it again"))
            }
        }
        for i in done.sorted().reversed() { table.entries.remove(at: i) }
        if !done.isEmpty { table.generation += 1 }
    }

    /// VMmanager's rule: biggest (or highest priority) first, each on the member with the fewest
    /// VMs that has the RAM, spares only when no ordinary node fits.
    private mutating func place(nowMillis now: UInt64, _ out: inout [HAAction]) {
        let waiting = table.entries.indices.filter { table.entries[$0].phase == .recovery }
        guard !waiting.isEmpty, now >= nextPlacementAtMillis else { return }
        let order = waiting.sorted { a, b in
            let x = table.entries[a].vm, y = table.entries[b].vm
            return (x.priority, x.ramMiB, y.name) > (y.priority, y.ramMiB, x.name)
        }
        var anyNoFit = false
        for i in order {
            let vm = table.entries[i].vm
            var candidates = members.filter { reports[$0.name] != nil && !table.entries[i].excluded.contains($0.name) }
            if candidates.isEmpty && !table.entries[i].excluded.isEmpty {
                // Every node failed to start it once: try them all again.
                table.entries[i].excluded = []
                candidates = members.filter { reports[$0.name] != nil }
            }
            let loads = candidates.map { ($0, load(of: $0.name)) }
            func pick(spares: Bool) -> (ClusterNode, Load)? {
                loads.filter { settings.spares.contains($0.0.name) == spares }
                    .sorted { ($0.1.vmCount, $0.0.id) < ($1.1.vmCount, $1.0.id) }
                    .first { $0.1.roomMiB >= vm.ramMiB }
            }
            if let (target, l) = pick(spares: false) ?? pick(spares: true) {
                table.entries[i].phase = .assigned
                table.entries[i].assignedTo = target.name
                table.entries[i].noFitAttempts = 0
                table.generation += 1
                let spare = settings.spares.contains(target.name) ? ", a spare: no ordinary node fits" : ""
                out.append(.log(.info, "placing \(vm.name) (\(vm.ramMiB) MiB, priority \(vm.priority)) on \(target.name): \(l.vmCount) VM\(l.vmCount == 1 ? "" : "s"), \(l.roomMiB) MiB room\(spare)"))
            } else {
                table.entries[i].noFitAttempts += 1
                table.generation += 1
                anyNoFit = true
                let room = loads.map { "\($0.0.name) \($0.1.roomMiB) MiB" }.joined(separator: ", ")
                out.append(.log(.error, "NO NODE FITS \(vm.name) (\(vm.ramMiB) MiB; room: \(room.isEmpty ? "no candidate" : room)): it stays in recovery (attempt \(table.entries[i].noFitAttempts)), retrying in \(config.placementRetryMillis / 1000) s"))
            }
        }
        nextPlacementAtMillis = anyNoFit ? now + config.placementRetryMillis : 0
    }

    /// The member that reports `vm` running, if any.
    private func runningNode(of vm: String) -> String? {
        members.first { reports[$0.name]?.vms.contains { $0.name == vm && $0.state == .running } == true }?.name
    }

    /// Takes the coordinator's table, keeping entries this node found that the table does not
    /// have yet (the coordinator may have published it just before it saw the same failure).
    private mutating func adopt(_ t: RecoveryTable) {
        let known = Set(t.entries.map(\.vm.name))
        let mineOnly = table.entries.filter { !known.contains($0.vm.name) && runningNode(of: $0.vm.name) == nil && $0.phase == .awaitingFence }
        table = t
        table.entries += mineOnly
    }

    struct Load {
        var vmCount: Int
        var roomMiB: Int
    }

    /// A node's VMs and RAM room as reported, minus what was assigned to it and not yet reported.
    private func load(of name: String) -> Load {
        guard let r = reports[name] else { return Load(vmCount: 0, roomMiB: 0) }
        let reported = Set(r.vms.map(\.name))
        let pending = table.entries.filter { $0.phase == .assigned && $0.assignedTo == name && !reported.contains($0.vm.name) }
        let room = r.ramFreeMiB + r.ramTotalMiB * config.overcommitPercent / 100 - pending.reduce(0) { $0 + $1.vm.ramMiB }
        return Load(vmCount: r.vms.count + pending.count, roomMiB: room)
    }

    /// Starts what the coordinator's table assigns to this node, once.
    private mutating func startAssigned(_ out: inout [HAAction]) {
        if isCoordinator && awaitingReportsFrom.isEmpty { tableCurrent = true }
        guard tableCurrent else { return }
        for e in table.entries where e.phase == .assigned && e.assignedTo == node.name {
            let name = e.vm.name
            if starting[name] != nil || failedStarts[name] != nil || localVMs.contains(where: { $0.name == name }) { continue }
            var v = e.vm
            v.state = .starting
            starting[name] = v
            out.append(.log(.info, "starting \(name) (assigned by \(coordinator?.name ?? "?"))"))
            out.append(.start(v))
        }
        // An assignment that moved away: forget its failure, so it can come back here.
        let mine = Set(table.entries.filter { $0.assignedTo == node.name }.map(\.vm.name))
        failedStarts = failedStarts.filter { mine.contains($0.key) }
    }

    public var report: NodeReport {
        var vms = localVMs.filter { starting[$0.name] == nil }
        vms += starting.values.sorted { $0.name < $1.name }
        vms.sort { $0.name < $1.name }
        // A VM being started takes its RAM from now on: the coordinator must not give it twice.
        let startingMiB = starting.values.reduce(0) { $0 + $1.ramMiB }
        var r = NodeReport(ramTotalMiB: ramTotalMiB, ramFreeMiB: ramFreeMiB - startingMiB, vms: vms, failedStarts: failedStarts,
                           settings: settings, recovery: table)
        r.selfFenced = selfFencedVMs.isEmpty ? nil : selfFencedVMs
        return r
    }

    private mutating func publishIfChanged(_ out: inout [HAAction]) {
        guard members.contains(node) else { return }
        let r = report
        if mustPublish || r != lastPublished {
            mustPublish = false
            lastPublished = r
            out.append(.publish(r))
        }
    }

    private func list(_ names: [String]) -> String {
        names.isEmpty ? "no VMs" : names.joined(separator: ", ")
    }
}

extension NodeReport {
    init(ramTotalMiB: Int, ramFreeMiB: Int, vms: [VMReport], failedStarts: [String: String], settings: HASettings, recovery: RecoveryTable?) {
        self.init(ramTotalMiB: ramTotalMiB, ramFreeMiB: ramFreeMiB, vms: vms, settings: settings, recovery: recovery)
        self.failedStarts = failedStarts
    }
}

extension NodeReport {
    /// What placement reads from a report.
    struct CapacityView: Equatable {
        var ramTotalMiB: Int
        var ramFreeMiB: Int
        var vms: [String]
        var failedStarts: [String: String]
        var spares: [String]
    }

    var capacityView: CapacityView {
        CapacityView(ramTotalMiB: ramTotalMiB, ramFreeMiB: ramFreeMiB, vms: vms.map { "\($0.name):\($0.state.rawValue)" },
                     failedStarts: failedStarts, spares: settings.spares)
    }
}
