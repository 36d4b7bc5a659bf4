import GeminusCore

/// What the pair's witness engine says on one node. The engine is a three-node Corosync cluster
/// (the two hosts and a witness host) with votequorum, and `geminus witness` on the witness host
/// keeping the record below; the simulator models the same.
///
/// Why not two nodes and a corosync-qnetd witness: qnetd holds no state of ours. A primary
/// whose secondary is gone runs unprotected and releases output; if it is later cut off too,
/// the secondary wins the witness's vote and would resume a checkpoint behind that output,
/// un-sending it. Only a witness that recorded "generation G ran unprotected after epoch E"
/// can stop that. A third Corosync node also bounds a cut-off node's stale quorum by
/// Corosync's own token timeout, not by qdevice's (about 4 s; ../shared/notes/corosync.md).
public struct WitnessView: Equatable, Sendable, CustomStringConvertible {
    /// This node's partition holds quorum (two of the three votes).
    public var quorate: Bool
    /// The pair's other node is in this node's partition: its agent in the CPG group or its node
    /// in the quorum view (Corosync reports the two separately; it is gone only when gone from
    /// both, since a host whose agent died may still run the guest).
    public var peerPresent: Bool
    /// The witness published its record in the current membership (since the last change):
    /// only then is `record` known to be what the witness holds now.
    public var witnessHeard: Bool
    /// The witness's record of this VM, if it has one.
    public var record: WitnessRecord?
    /// The newest generation whose primary said that it stopped its guest for good (a
    /// self-fence), heard in this membership: from the witness's publication, or from that
    /// primary's agent itself, whose word then comes with the newest unprotect record it ran
    /// under (merged into `record`). Its node may still be in the cluster (Corosync runs on
    /// after the agent fenced), so without this its secondary could never win once the cut that
    /// caused the fence healed, and the VM would stay down until an operator came.
    public var stoppedGeneration: Generation?

    public init(quorate: Bool, peerPresent: Bool, witnessHeard: Bool = false, record: WitnessRecord? = nil,
                stoppedGeneration: Generation? = nil) {
        self.quorate = quorate
        self.peerPresent = peerPresent
        self.witnessHeard = witnessHeard
        self.record = record
        self.stoppedGeneration = stoppedGeneration
    }

    /// The view from what a node heard in its membership: the witness's publication (its record
    /// and stopped generation) and the stopped primary's own word (its generation, and the newest
    /// record the witness had confirmed to it: it alone releases for its generation). Each stop
    /// and record is the newer of the two.
    public init(quorate: Bool, peerPresent: Bool, witnessHeard: Bool, witnessRecord: WitnessRecord?, witnessStopped: Generation?,
                peerStop: (generation: Generation, record: WitnessRecord?)?) {
        let peerRecord = peerStop?.record
        let record = witnessRecord.map { r in peerRecord.map { r.merged(with: $0) } ?? r } ?? peerRecord
        self.init(quorate: quorate, peerPresent: peerPresent, witnessHeard: witnessHeard, record: record,
                  stoppedGeneration: [witnessStopped, peerStop?.generation].compactMap { $0 }.max())
    }

    public var description: String {
        var s = "\(quorate ? "quorate" : "not quorate"), peer \(peerPresent ? "present" : "absent")"
        s += witnessHeard ? ", witness heard" : ", witness not heard"
        if let r = record { s += ", witness record \(r)" }
        if let g = stoppedGeneration { s += ", generation \(g) stopped" }
        return s
    }
}

/// What the witness keeps per VM: the newest generation that announced running unprotected,
/// and the last epoch it had captured then (every checkpoint up to it is behind released output).
public struct WitnessRecord: Equatable, Sendable, CustomStringConvertible {
    public var generation: Generation
    public var unprotectedAfter: Epoch

    public init(generation: Generation, unprotectedAfter: Epoch) {
        self.generation = generation
        self.unprotectedAfter = unprotectedAfter
    }

    /// Whether a replica at `generation` holding `committed` may still be resumed.
    public func allowsResuming(_ committed: Epoch, at generation: Generation) -> Bool {
        if self.generation > generation { return false }
        if self.generation == generation { return committed > unprotectedAfter }
        return true
    }

    /// Keeps the later of two records (the witness merges announcements this way).
    public func merged(with other: WitnessRecord) -> WitnessRecord {
        if other.generation != generation { return other.generation > generation ? other : self }
        return other.unprotectedAfter > unprotectedAfter ? other : self
    }

    public var description: String { "generation \(generation) unprotected after epoch \(unprotectedAfter)" }
}

/// The two bounds arbitration rests on, and what follows from them.
///
/// A node cut off from the others goes on reporting itself quorate until Corosync forms its new
/// membership; the other side may have formed its own a little earlier. So the winning
/// secondary may not resume at the moment it wins: it waits out the loser's stale quorum and
/// then the loser's self-fence.
///
/// - the primary stops its guest within `selfFenceNanos` of its witness view saying "not quorate";
/// - a cut-off node's view says "not quorate" within `staleQuorumNanos` of the other side winning;
/// - so the secondary, once it has won (quorate, the primary gone from its view), waits
///   `takeoverWaitNanos` = `staleQuorumNanos + selfFenceNanos` before resuming: by then the
///   primary has stopped.
public struct ArbitrationTimings: Equatable, Sendable {
    public var staleQuorumNanos: UInt64
    public var selfFenceNanos: UInt64

    public init(staleQuorumNanos: UInt64, selfFenceNanos: UInt64) {
        self.staleQuorumNanos = staleQuorumNanos
        self.selfFenceNanos = selfFenceNanos
    }

    public var takeoverWaitNanos: UInt64 { staleQuorumNanos + selfFenceNanos }

    /// How long the primary's node may go without the cluster delivering a message of its own
    /// before the primary fences. Corosync's quorum API goes on saying "quorate" while a node
    /// cannot finish forming a new membership: with one-way loss measured for 4.2 s (token 300),
    /// while the other side formed its own within 0.7 s and won. A node that holds no token
    /// sends nothing, so its own messages stop at once. The secondary resumes no sooner than
    /// token + consensus + takeoverWait after the primary's last token; the primary stops within
    /// ringSilence + selfFence of it; ringSilence = staleQuorum leaves token + consensus to spare,
    /// and is twice the time a normal membership change takes (token + consensus, no delivery).
    public var ringSilenceNanos: UInt64 { staleQuorumNanos }

    /// How often the agents' fence watch looks (part of `selfFenceNanos`).
    public static let fenceTickNanos: UInt64 = 10_000_000

    /// From Corosync's effective token and consensus timeouts (`runtime.config.totem.token` and
    /// `.consensus`). Every member of a broken ring gives up on the token within `token` of its
    /// last one and installs its new membership `consensus` later; twice that covers the skew
    /// between the two sides. The primary's fence watch ticks every `fenceTickNanos`; a stop
    /// takes at most one tick plus `killNanos` (SIGKILL of QEMU, or a libvirt destroy).
    public static func corosync(tokenMillis: UInt64, consensusMillis: UInt64, fenceTickNanos: UInt64 = ArbitrationTimings.fenceTickNanos,
                                killNanos: UInt64 = 190_000_000) -> ArbitrationTimings {
        ArbitrationTimings(staleQuorumNanos: 2 * (tokenMillis + consensusMillis) * 1_000_000, selfFenceNanos: fenceTickNanos + killNanos)
    }
}

/// How the pair decides who may run the VM.
public enum Arbitration: Equatable, Sendable {
    /// Nothing decides: the secondary takes over on silence alone and a primary that lost its
    /// secondary runs unprotected. A partition between two live hosts then runs the VM twice.
    /// For a single host (the demo) and tests of the pipeline only.
    case none
    /// A witness decides (see `ArbitrationTimings`).
    case witness(ArbitrationTimings)

    public var timings: ArbitrationTimings? {
        if case .witness(let t) = self { return t }
        return nil
    }
}

/// The primary's right to keep its guest running, as a state machine (no I/O, no clock): the
/// fence watch of the agent drives it from a thread of its own, so a busy or stuck epoch loop
/// cannot delay a self-fence.
///
/// The primary runs while its witness says quorate; "not quorate" means the other side may win,
/// so the guest is stopped for good and held output is never released. A watch that did not
/// tick for longer than `selfFenceNanos` (the host or the agent was frozen, SIGSTOP) cannot
/// trust the view it holds, which may predate a lost quorum: it fences too.
public struct PrimaryLease: Sendable {
    public enum Event: Equatable, Sendable {
        case view(WitnessView, nowNanos: UInt64)
        case tick(nowNanos: UInt64)
        /// The cluster delivered a message of this node's own at `atNanos` (the ring works).
        case ownDelivery(atNanos: UInt64)
        /// Whether this primary holds the only copy that may run (`PrimaryMachine.soleCopy`).
        /// Turning it off arms the lease: a view or ring that is bad by then fences at once.
        case soleCopy(Bool, nowNanos: UInt64)
    }

    public enum Action: Equatable, Sendable {
        /// Stop the guest now and for good; discard held output. Nothing follows.
        case selfFence(reason: String)
    }

    public let timings: ArbitrationTimings
    /// Whether deliveries of its own messages are watched (`ringSilenceNanos`): the agents feed
    /// them; a caller that does not must not turn it on, or the silence fences it.
    public let watchesRing: Bool
    public private(set) var view: WitnessView?
    public private(set) var fenced = false
    private var lastTickNanos: UInt64?
    /// The last own delivery, or the first tick before there was one.
    private var ringHeardNanos: UInt64?
    /// While set, what would fence only makes the lease unhealthy: no other host may resume
    /// this VM, so stopping it would destroy the last copy and protect nothing.
    public private(set) var soleCopy = false

    public init(timings: ArbitrationTimings, watchesRing: Bool = false) {
        self.timings = timings
        self.watchesRing = watchesRing
    }

    public mutating func handle(_ event: Event) -> [Action] {
        guard !fenced else { return [] }
        switch event {
        case .view(let v, let now):
            view = v
            let frozen = gap(now)
            lastTickNanos = now
            if let frozen { return fence(frozen) }
            return fence(unhealthy(now))
        case .tick(let now):
            let frozen = gap(now)
            lastTickNanos = now
            if watchesRing && ringHeardNanos == nil { ringHeardNanos = now }
            if let frozen { return fence(frozen) }
            return fence(unhealthy(now))
        case .soleCopy(let on, let now):
            soleCopy = on
            return on ? [] : fence(unhealthy(now))
        case .ownDelivery(let at):
            // Counted from the first tick on: a delivery from before this lease (a secondary that
            // just took over last published long ago) says nothing about the ring now.
            if let heard = ringHeardNanos { ringHeardNanos = max(heard, at) }
            return []
        }
    }

    /// Why this node may not go on running its guest now (a frozen watch aside), or nil.
    public func unhealthy(_ now: UInt64) -> String? {
        if let v = view, !v.quorate {
            return "the witness says this node is not quorate (\(v)): the secondary may take over"
        }
        if watchesRing, let heard = ringHeardNanos, now > heard, now - heard > timings.ringSilenceNanos {
            return "the cluster delivered none of this node's messages for \((now - heard) / 1_000_000) ms (over \(timings.ringSilenceNanos / 1_000_000) ms): its ring is broken, and the quorate view Corosync still shows may be stale"
        }
        return nil
    }

    private func gap(_ now: UInt64) -> String? {
        guard let last = lastTickNanos, now > last, now - last > timings.selfFenceNanos else { return nil }
        return "the fence watch did not run for \((now - last) / 1_000_000) ms (over \(timings.selfFenceNanos / 1_000_000) ms: this host or agent was frozen), so its view of the witness may be stale"
    }

    private mutating func fence(_ reason: String?) -> [Action] {
        guard let reason, !soleCopy else { return [] }
        fenced = true
        return [.selfFence(reason: reason)]
    }
}
