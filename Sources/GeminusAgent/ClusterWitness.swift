import Foundation
import GeminusCluster
import GeminusCore
import GeminusReplication
import Logging

/// `WitnessLink` on the cluster seam (`CorosyncCluster` in production, `SimulatedCluster` in
/// tests): the view is votequorum's quorate flag, the peer node present while it is in the CPG
/// membership or the quorum view (Corosync reports them separately; gone means gone from
/// both), and the witness's latest record of
/// this VM heard since the last membership change.
public final class ClusterWitnessLink: WitnessLink, @unchecked Sendable {
    private let cluster: any Cluster
    private let vm: String
    private let peer: ClusterNodeID
    /// The witness's node, nil: any node but this one and the peer (the three-node cluster of
    /// docs/ARBITRATION.md has exactly one such node).
    private let witness: ClusterNodeID?
    private let logger: Logger
    private let lock = NSLock()
    private var refusedThrottle = LogThrottle()
    private var _refusedPublications = 0
    private var cpgMembers: Set<ClusterNodeID> = []
    private var quorum: QuorumState
    private var heard = false
    private var record: WitnessRecord?
    private var stoppedGeneration: Generation?
    /// The peer agent's own word in this membership: it stopped (a self-fenced primary), and
    /// the newest unprotect announcement the witness had confirmed to it.
    private var peerStopped: (generation: Generation, record: WitnessRecord?)?
    private var announced: WitnessRecord?
    /// The newest announcement the witness was heard holding: the primary can only have run
    /// unprotected under one of those.
    private var confirmed: WitnessRecord?
    private var announcedStopped: Generation?
    private var version: UInt64 = 0
    private var seenAnyView = false
    private var stopped = false
    /// Whether this agent keeps the ring lease (a primary): its state is republished every
    /// `heartbeatMillis`, and `lastOwnDeliveryNanos` says when the cluster last delivered it.
    private var holdingLease = false
    private var lastHeartbeatNanos: UInt64 = 0
    private var ownDeliveryNanos: UInt64?
    private var publishThrottle = LogThrottle()
    static let heartbeatMillis: UInt64 = 100
    private var thread: Thread?

    public init(cluster: any Cluster, vm: String, peer: ClusterNodeID, witness: ClusterNodeID? = nil, logger: Logger) {
        self.cluster = cluster
        self.vm = vm
        self.peer = peer
        self.witness = witness
        self.logger = logger
        quorum = cluster.quorum
        let t = Thread { [weak self] in self?.loop() }
        t.name = "geminus-witness-link"
        thread = t
        t.start()
    }

    public var current: (view: WitnessView, version: UInt64)? {
        lock.withLock { seenAnyView ? (viewLocked(), version) : nil }
    }

    public var lastOwnDeliveryNanos: UInt64? { lock.withLock { ownDeliveryNanos } }

    /// Witness publications refused because they came from a node that is not the witness.
    public var refusedPublications: Int { lock.withLock { _refusedPublications } }

    /// Only the witness speaks for the witness: a pair node (the peer agent, or a process on
    /// it) publishing a witness message could otherwise make this secondary resume while the
    /// primary runs (a forged `stopped`), or block every failover (a forged record).
    private func isWitness(_ node: ClusterNodeID) -> Bool {
        if let witness { return node == witness }
        return node != peer && node != cluster.localNode.id
    }

    public func holdLease() {
        lock.withLock { holdingLease = true }
    }

    private func viewLocked() -> WitnessView {
        // Gone only when gone from both: a node whose agent died but whose Corosync runs may
        // still run the guest (a libvirt domain outlives its agent), so it counts as present.
        let peerPresent = cpgMembers.contains(peer) || quorum.memberIDs.contains(peer)
        return WitnessView(quorate: quorum.quorate, peerPresent: peerPresent, witnessHeard: heard, witnessRecord: record,
                           witnessStopped: stoppedGeneration, peerStop: peerStopped)
    }

    public func announce(_ r: WitnessRecord) {
        lock.withLock { announced = announced.map { $0.merged(with: r) } ?? r }
        publish()
    }

    /// Also withdraws an announcement the witness was never heard holding: the primary never
    /// released under it, and recorded late (after a heal) it would forbid the secondary's
    /// checkpoint for nothing, leaving the VM down.
    public func announceStopped(_ generation: Generation) {
        lock.withLock {
            announcedStopped = max(announcedStopped ?? generation, generation)
            announced = confirmed
        }
        publish()
    }

    public func stop() {
        lock.withLock { stopped = true }
        cluster.close()
    }

    private func publish() {
        let message: WitnessMessage? = lock.withLock { stopped ? nil : .agent(vm: vm, record: announced, stopped: announcedStopped) }
        guard let message else { return }  // `stop()` closed the cluster
        do { try cluster.publish(message.encoded()) } catch {
            // The heartbeat retries ten times a second: say it once per distinct error and 10 s.
            if let repeats = lock.withLock({ publishThrottle.admit("\(error)", nowNanos: Monotonic.nanos()) }) {
                logger.error("cannot publish to the cluster: \(error)\(repeats > 0 ? " (\(repeats) more since)" : "")")
            }
        }
    }

    private func loop() {
        publish()
        while !lock.withLock({ stopped }) {
            let beat: Bool = lock.withLock {
                let now = Monotonic.nanos()
                guard holdingLease, now - lastHeartbeatNanos >= Self.heartbeatMillis * 1_000_000 else { return false }
                lastHeartbeatNanos = now
                return true
            }
            if beat { publish() }
            let event: ClusterEvent?
            do { event = try cluster.nextEvent(timeoutMillis: 20) } catch {
                if lock.withLock({ stopped }) { return }  // `stop()` closed it
                // Outside the cluster: nothing may be trusted, say "not quorate".
                logger.critical("lost the cluster connection: \(error); this node counts itself not quorate")
                lock.withLock {
                    quorum = QuorumState(quorate: false, changedAtMillis: Monotonic.nanos() / 1_000_000)
                    heard = false
                    seenAnyView = true
                    version += 1
                }
                return
            }
            guard let event else { continue }
            var republish = false
            var refusal: String?
            lock.withLock {
                let before = seenAnyView ? viewLocked() : nil
                defer {
                    seenAnyView = true
                    // A new version only for a new view: heartbeats change nothing a machine sees.
                    if viewLocked() != before { version += 1 }
                }
                switch event {
                case .membership(let m):
                    cpgMembers = Set(m.members.map(\.id))
                    // Only a record published in this membership says what the witness holds now.
                    heard = false
                    record = nil
                    stoppedGeneration = nil
                    peerStopped = nil
                    republish = true
                case .quorum(let q):
                    // Not a reason to forget the witness: its publications come through the CPG,
                    // in order with the CPG's memberships, while the quorum service reports on
                    // its own. Reset here, a publication that arrived just before this node's
                    // quorum event was lost, and the secondary waited for "the witness's record
                    // in this membership" until the next change (ca-partition-test, host-killed
                    // and failover-and-back, once each).
                    if q.memberIDs != quorum.memberIDs { republish = true }
                    quorum = q
                case .published(let from, let state):
                    if from.id == cluster.localNode.id { ownDeliveryNanos = Monotonic.nanos() }
                    let message = WitnessMessage(decoding: state)
                    if from.id == peer, case .agent(let v, let r, let g?)? = message, v == vm {
                        peerStopped = (g, r)
                    }
                    guard case .witness(let records, let stopped)? = message else { return }
                    guard isWitness(from.id) else {
                        _refusedPublications += 1
                        if let repeats = refusedThrottle.admit("\(from.id)", nowNanos: Monotonic.nanos()) {
                            refusal = "ignored a witness publication from node \(from) (\(_refusedPublications) so far\(repeats > 0 ? ", \(repeats) since the last report" : "")): only \(witness.map { "node \($0) (--witness-node-id)" } ?? "the cluster's third node, neither this one nor the peer \(peer),") speaks for the witness; something on that node forges arbitration messages"
                        }
                        return
                    }
                    heard = true
                    record = records[vm]
                    stoppedGeneration = stopped[vm]
                    if let r = record, let a = announced, r.merged(with: a) == r { confirmed = a }
                }
            }
            if let refusal { logger.error("\(refusal)") }
            if republish { publish() }
        }
    }
}

/// The witness's side: remembers the newest record and stopped generation per VM from the
/// agents' announcements, keeps them on disk (written and fsynced before they are published, so
/// a witness that restarts still knows), and publishes all of it after every change and
/// membership change.
public final class WitnessService: @unchecked Sendable {
    private let cluster: any Cluster
    private let path: String
    private let logger: Logger
    /// The nodes whose agents may announce; nil: every node but the witness's own.
    private let pairNodes: Set<ClusterNodeID>?
    private var refusedThrottle = LogThrottle()
    public private(set) var refusedAnnouncements = 0
    public private(set) var records: [String: WitnessRecord]
    public private(set) var stopped: [String: Generation]

    public init(cluster: any Cluster, statePath: String, logger: Logger, pairNodes: Set<ClusterNodeID>? = nil) throws(GeminusError) {
        self.cluster = cluster
        path = statePath
        self.logger = logger
        self.pairNodes = pairNodes
        records = [:]
        stopped = [:]
        if let data = FileManager.default.contents(atPath: statePath) {
            guard case .witness(let r, let s)? = WitnessMessage(decoding: Array(data)) else {
                throw GeminusError(.invalidArgument, "the witness state file \(statePath) is not one this version wrote",
                                   fix: "move it away only if no CA pair ran unprotected since it was written; otherwise restore it")
            }
            records = r
            stopped = s
        }
    }

    private var state: WitnessMessage { .witness(records: records, stopped: stopped) }

    private func acceptsAgent(_ node: ClusterNodeID) -> Bool {
        if let pairNodes { return pairNodes.contains(node) }
        return node != cluster.localNode.id
    }

    /// Serves until `shouldStop` says so or the cluster connection is lost (throws then).
    public func run(shouldStop: () -> Bool) throws {
        try cluster.publish(state.encoded())
        while !shouldStop() {
            guard let event = try cluster.nextEvent(timeoutMillis: 200) else { continue }
            switch event {
            case .membership, .quorum:
                try cluster.publish(state.encoded())
            case .published(let from, let message):
                guard case .agent(let vm, let record, let stoppedGeneration)? = WitnessMessage(decoding: message) else { continue }
                guard acceptsAgent(from.id) else {
                    // A stop notice replaces a VM's record and 4096 fake VMs fill the table:
                    // only the pair's agents may say either.
                    refusedAnnouncements += 1
                    if let repeats = refusedThrottle.admit("\(from.id)", nowNanos: Monotonic.nanos()) {
                        logger.error("ignored an announcement for \(vm) from node \(from) (\(refusedAnnouncements) so far\(repeats > 0 ? ", \(repeats) since the last report" : "")): only \(pairNodes.map { "nodes \($0.sorted().map(String.init).joined(separator: ", ")) (--pair-node-ids)" } ?? "the pair's nodes, not the witness's own,") may announce")
                    }
                    continue
                }
                var merged = record.map { r in records[vm].map { $0.merged(with: r) } ?? r } ?? records[vm]
                if let g = stoppedGeneration, let held = records[vm], held.generation == g, record.map({ $0.generation == g }) ?? true {
                    // A stopped primary's word on its own generation is final: it alone releases
                    // for it, and it states the record it ran under. A request it made while its
                    // ring was broken may reach this witness only after the heal (Corosync sends
                    // then what was queued), after it fenced without ever being answered: that
                    // request is withdrawn here, or it would forbid the checkpoint for nothing.
                    merged = record
                }
                let newestStopped = stoppedGeneration.map { max(stopped[vm] ?? $0, $0) } ?? stopped[vm]
                guard merged != records[vm] || newestStopped != stopped[vm] else { continue }
                guard records[vm] != nil || stopped[vm] != nil || Set(records.keys).union(stopped.keys).count < WitnessMessage.maxRecords else {
                    logger.error("refused a record for \(vm) from \(from): the witness holds \(WitnessMessage.maxRecords) VMs already")
                    continue
                }
                let (recordChanged, stopChanged) = (merged != records[vm], newestStopped != stopped[vm])
                records[vm] = merged
                stopped[vm] = newestStopped
                let encoded = state.encoded()
                try persist(encoded)
                if recordChanged, let merged { logger.notice("recorded \(vm): \(merged) (announced by \(from))") }
                if stopChanged, let newestStopped { logger.notice("recorded \(vm): generation \(newestStopped) stopped its guest for good (announced by \(from))") }
                try cluster.publish(encoded)
            }
        }
    }

    /// Replaces the state file with `bytes` so that it survives a power cut: the new file is
    /// fsynced, renamed over the old one, and the directory fsynced so the rename is kept too.
    private func persist(_ bytes: [UInt8]) throws {
        func failure(_ what: String, _ e: Int32) -> GeminusError {
            GeminusError(.io, "cannot \(what) for the witness state \(path): \(String(cString: strerror(e)))",
                         fix: "check the disk and the permissions of \((path as NSString).deletingLastPathComponent); the witness stops rather than publish what it has not kept")
        }
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw failure("create \(tmp)", errno) }
        var e = writeFully(fd, bytes)
        if e == 0 && fsync(fd) != 0 { e = errno }
        close(fd)
        guard e == 0 else { throw failure("write \(tmp)", e) }
        guard rename(tmp, path) == 0 else { throw failure("rename \(tmp)", errno) }
        let parent = (path as NSString).deletingLastPathComponent
        let dir = open(parent.isEmpty ? "." : parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dir >= 0 else { throw failure("open the directory", errno) }
        defer { close(dir) }
        guard fsync(dir) == 0 else { throw failure("fsync the directory", errno) }
    }
}
