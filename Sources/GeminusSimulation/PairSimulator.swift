import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication

/// The whole pair in one process, deterministic under one seed: the real `PrimaryNode` and
/// `SecondaryNode` (the very drivers the agents step, with their machines, encoder, replica and
/// output-commit port) over the world's side of their seams (`SimulatedSeams.swift`): a
/// `SimulatedGuest` stepped by the world, two `SimulatedLink`s, a `SimulatedClock`, a model of
/// the witness, and an output observer. No threads and no real time, so the same seed gives the
/// same run byte for byte.
///
/// The pair's witness (`SimulatedWitness`, a model of the three-node Corosync cluster) feeds the
/// real arbitration: `PrimaryLease` on the primary, the takeover gate of `SecondaryMachine`.
///
/// The promises are checked after every step (`Checks`); a broken one is a `Violation`. A run
/// without arbitration (`SimulationConfig.arbitration == .none`, to show why it exists) counts
/// the split brains its partitions cause as `knownGaps` instead.
public final class PairSimulator {
    public let config: SimulationConfig
    public internal(set) var clock = SimulatedClock()
    public internal(set) var toSecondary: SimulatedLink
    public internal(set) var toPrimary: SimulatedLink
    public internal(set) var schedule: [ScheduledFault]
    public let faultKinds: Set<FaultKind>

    var linkRandom: SimulationRandom
    var worldRandom: SimulationRandom
    var witnessRandom: SimulationRandom
    var witness: SimulatedWitness?
    var selfFences = 0
    /// Since when the secondary and the witness have been able to talk (L1 with arbitration
    /// counts from then: before it, no takeover is allowed).
    var secondaryWithWitnessSinceNanos: UInt64? = 0
    var nextFault = 0
    var primary: SimPrimaryHost?
    var secondary: SimSecondaryHost?
    /// What the primary captured at each epoch: what the replica must equal once it commits it.
    var captured: [Epoch: CapturedState] = [:]
    var observer = OutputObserver()
    var trace: [TraceEvent] = []
    var violations: [Violation] = []
    var knownGaps: [Violation] = []
    var faultsInjected: [String: Int] = [:]
    var nextConnection: UInt64 = 0
    /// When the primary stopped running (crash or freeze), for L1; nil while it runs.
    var primaryLostAtNanos: UInt64?
    /// Whether the secondary held a whole checkpoint when the primary was lost (else nothing can resume).
    var secondaryCouldResumeAtLoss = false
    /// The last time a fault that isolates a live primary (partition, freeze) was in force.
    var lastIsolationNanos: UInt64?
    var isolationActive = false
    /// Set at a takeover while the old primary still lives and an isolation fault explains it.
    var splitBrainIsKnownGap = false
    var reported: Set<String> = []
    var fullCheckpoints = 0
    var resyncs = 0
    var epochsCommitted = 0
    var staleFramesRefused = 0
    var staleDialsRefused = 0
    var takeoverAtNanos: UInt64?
    /// Whether the secondary said "I hold a resumable checkpoint" when it accepted connection c.
    var acceptedHolding: [UInt64: Bool] = [:]
    var deferredEpochs = 0
    var cannotTakeOverReported = false
    /// The last output sequence the resumed guest's history holds, from the takeover on.
    var resumedOutputSequence: UInt64?
    var traceDropped = 0
    /// The highest output sequence any checkpoint the secondary committed contains.
    var committedOutputHighWater: UInt64 = 0
    var incarnationAtLoss = 0
    /// Guest packets released as NIC frames and as console lines (both copies).
    var framesReleased = 0
    var linesReleased = 0

    /// A run of `config.seed` with its faults drawn from `faults` (see `FaultPlanner`).
    public convenience init(config: SimulationConfig, faults: Set<FaultKind>) throws(GeminusError) {
        var master = SimulationRandom(seed: config.seed)
        let linkRandom = master.split()
        let worldRandom = master.split()
        let (s, p, schedule, chosen) = FaultPlanner.plan(enabled: faults, config: config, rng: master.split())
        try self.init(config: config, toSecondaryFaults: s, toPrimaryFaults: p, schedule: schedule, kinds: chosen,
                      linkRandom: linkRandom, worldRandom: worldRandom, witnessRandom: master.split())
    }

    /// A run with an explicit schedule (scenarios, and the tests that change one thing of a plan).
    public init(config: SimulationConfig, toSecondaryFaults: LinkFaults = LinkFaults(), toPrimaryFaults: LinkFaults = LinkFaults(),
                schedule: [ScheduledFault] = [], kinds: Set<FaultKind> = [],
                linkRandom: SimulationRandom? = nil, worldRandom: SimulationRandom? = nil,
                witnessRandom: SimulationRandom? = nil) throws(GeminusError) {
        self.config = config
        var master = SimulationRandom(seed: config.seed)
        let l = master.split()
        let w = master.split()
        _ = master.split()
        let wr = master.split()
        self.linkRandom = linkRandom ?? l
        self.worldRandom = worldRandom ?? w
        self.witnessRandom = witnessRandom ?? wr
        if config.arbitration != .none {
            witness = SimulatedWitness(timings: .init(detectNanos: config.witnessDetectNanos, deliveryNanos: config.witnessDeliveryNanos))
        }
        self.schedule = schedule.sorted { $0.atNanos < $1.atNanos }
        faultKinds = kinds
        toSecondary = SimulatedLink(name: "primary>secondary", capacityBytes: config.linkCapacityBytes)
        toPrimary = SimulatedLink(name: "secondary>primary", capacityBytes: config.linkCapacityBytes)
        toSecondary.faults = toSecondaryFaults
        toPrimary.faults = toPrimaryFaults
        readBudget = config.secondaryReadBytesPerStep
        note("world", "seed \(config.seed), guest \(config.guestRamMiB) MiB, epoch every \(config.primary.epochIntervalNanos / 1_000_000) ms, takeover after \(config.secondary.takeoverAfterNanos / 1_000_000) ms of silence", notable: true)
        if let t = config.arbitration.timings {
            note("world", "witness: a third Corosync node; takeover waits \(t.takeoverWaitNanos / 1_000_000) ms after winning", notable: true)
        } else {
            note("world", "no arbitration: partitions can run the VM twice", notable: true)
        }
        if !kinds.isEmpty { note("world", "faults: \(kinds.sorted().map(\.rawValue).joined(separator: ","))", notable: true) }
        primary = try makePrimary()
        secondary = makeSecondary(incarnation: 1)
    }

    var readBudget: Int?
    public var now: UInt64 { clock.monotonicNanos }
    public var isTakenOver: Bool { secondary?.resumed != nil }
    public var primaryIsAlive: Bool { primary != nil }
    public var secondaryIsAlive: Bool { secondary != nil }
    public var primaryProtection: PrimaryMachine.Protection? { primary?.node?.machine.protection }
    public var secondaryState: SecondaryMachine.State? { secondary?.node.machine.state }

    /// What backpressure did: epochs deferred, guest steps stalled on a full output queue, and
    /// the largest the primary's send queue and the primary→secondary link ever were.
    public var backpressure: (deferredEpochs: Int, guestStalls: Int, peakSendQueueBytes: Int, peakLinkBytes: Int) {
        (deferredEpochs, primary?.guestStalls ?? 0, primary?.peakSendQueueBytes ?? 0, toSecondary.peakQueuedBytes)
    }

    // MARK: - Running

    /// Runs to `config.durationNanos` and returns what happened.
    /// Runs to `config.durationNanos` and returns what happened. A run whose primary is dead
    /// and whose secondary has taken over ends early: only the resumed guest runs on, and
    /// nothing it does alone can break a promise.
    public func run() -> RunResult {
        while now < config.durationNanos && !(primary == nil && isTakenOver) { step() }
        return result()
    }

    /// Runs for `nanos` more of simulated time (scenarios).
    public func run(forNanos nanos: UInt64) {
        let end = now + nanos
        while now < end { step() }
    }

    public func step() {
        clock.advance(byNanos: config.stepNanos)
        while nextFault < schedule.count, schedule[nextFault].atNanos <= now {
            inject(schedule[nextFault].what)
            nextFault += 1
        }
        if isolationActive || (primary?.isFrozen ?? false) { lastIsolationNanos = now }
        stepWitness()
        stepPrimary()
        stepSecondary()
        checkAfterStep()
    }

    public func result() -> RunResult {
        var faultsInjected = self.faultsInjected
        // Latency is a setting of the whole run, not an event: count the runs it slowed.
        if faultKinds.contains(.delay) { faultsInjected["delay", default: 0] += 1 }
        for link in [toSecondary, toPrimary] {
            for (k, n) in [("loss", link.lost), ("duplicate", link.duplicated), ("reorder", link.reordered), ("corruption", link.corrupted)] where n > 0 {
                faultsInjected[k, default: 0] += n
            }
        }
        var trace = self.trace
        if traceDropped > 0 {
            trace.append(TraceEvent(atNanos: now, node: "world", text: "trace truncated: \(traceDropped) events beyond the limit of \(Self.traceLimit) were dropped", notable: true))
        }
        return RunResult(seed: config.seed, faultKinds: faultKinds.sorted(), faultsInjected: faultsInjected,
                  violations: violations, knownGaps: knownGaps, tookOver: isTakenOver, takeoverAtNanos: takeoverAtNanos,
                  epochsCommitted: epochsCommitted, fullCheckpoints: fullCheckpoints, resyncs: resyncs,
                  outputsReleased: observer.released.count, staleFramesRefused: staleFramesRefused,
                  staleDialsRefused: staleDialsRefused, cannotTakeOver: cannotTakeOverReported && !isTakenOver && primaryLostAtNanos != nil,
                  selfFences: selfFences, trace: trace)
    }

    // MARK: - Faults

    /// Applies one fault now (the schedule calls this; so do scenarios).
    public func inject(_ what: ScheduledFault.What) {
        switch what {
        case .crashPrimary(let point):
            guard let p = primary else { return }
            p.armedCrash = point
            note("world", "primary will crash \(point.rawValue)", notable: true)
        case .crashSecondary:
            guard let s = secondary, s.resumed == nil else { return }
            count("secondary-crash")
            note("secondary", "CRASHED (incarnation \(s.incarnation))", notable: true)
            s.isAlive = false
            secondary = nil
            witness?.setRunning(.secondary, false)
            crashedSecondaryIncarnation = s.incarnation
        case .restartSecondary:
            guard secondary == nil, !isTakenOver else { return }
            // A restarted secondary has nothing: no replica, no connection. It keeps only the
            // pair's generation (its configuration), so the primary must resync with a full epoch.
            crashedSecondaryIncarnation += 1
            secondary = makeSecondary(incarnation: crashedSecondaryIncarnation)
            witness?.setRunning(.secondary, true, fresh: true)
            note("secondary", "restarted empty (incarnation \(crashedSecondaryIncarnation))", notable: true)
        case .partition(let oneWay):
            switch oneWay {
            case nil:
                toSecondary.cut(); toPrimary.cut()
                witness?.setCut(.primary, .secondary, true)
                count("partition")
                note("world", "partition primary secondary", notable: true)
            case true?:
                // Corosync's ring breaks on one-way loss as on any other.
                toSecondary.cut()
                witness?.setCut(.primary, .secondary, true)
                witness?.setCannotSend(.primary, true)
                count("one-way-partition")
                note("world", "partition primary -> secondary (one way)", notable: true)
            case false?:
                toPrimary.cut()
                witness?.setCut(.primary, .secondary, true)
                witness?.setCannotSend(.secondary, true)
                count("one-way-partition")
                note("world", "partition secondary -> primary (one way)", notable: true)
            }
            isolationActive = true
            lastIsolationNanos = now
        case .heal:
            guard toSecondary.isCut || toPrimary.isCut else { return }
            toSecondary.heal(); toPrimary.heal()
            witness?.setCut(.primary, .secondary, false)
            witness?.setCannotSend(.primary, false)
            witness?.setCannotSend(.secondary, false)
            isolationActive = false
            note("world", "heal", notable: true)
        case .cutWitness(let fromPrimary):
            guard witness != nil else { return }
            let node: SimulatedWitness.Node = fromPrimary ? .primary : .secondary
            count("witness-loss")
            witness?.setCut(node, .witness, true)
            note("world", "partition \(node) witness", notable: true)
        case .healWitness:
            guard let w = witness, w.isCut(.primary, .witness) || w.isCut(.secondary, .witness) else { return }
            witness?.setCut(.primary, .witness, false)
            witness?.setCut(.secondary, .witness, false)
            note("world", "heal witness", notable: true)
        case .freezePrimary(let forNanos):
            guard let p = primary, !p.isFrozen else { return }
            p.armedFreezeNanos = forNanos
            note("world", "primary will freeze for \(forNanos / 1_000_000) ms at its next send", notable: true)
        case .slowSecondary(let bytes):
            count("slow-secondary")
            readBudget = bytes
            note("world", "secondary reads at most \(bytes >> 10) KiB per ms", notable: true)
        case .jumpWallClock(let delta):
            count("wall-clock-jump")
            clock.jumpWall(byNanos: delta)
            note("world", "wall clock jumps \(delta >= 0 ? "+" : "-")\(delta.magnitude / 1_000_000_000) s", notable: true)
        }
    }

    var crashedSecondaryIncarnation = 1
    var primaryPageCount: Int { config.guestRamMiB << 20 / GuestPage.size }

    /// What the primary's guest runs (and so what a resumed one continues).
    var guestWorkload: SimulatedWorkload {
        var w = SimulatedWorkload(ramMiB: config.guestRamMiB, dirtyPagesPerSecond: config.dirtyPagesPerSecond,
                                  outputsPerSecond: config.outputsPerSecond, seed: config.seed)
        w.nicFrames = config.nicFrames
        w.diskBlocks = config.diskBlocks
        w.diskWriteEverySteps = config.diskWriteEverySteps
        return w
    }

    /// Link faults as a scenario sets them (delay, loss, ...), for both directions.
    public func setLinkFaults(_ f: LinkFaults) {
        toSecondary.faults = f
        toPrimary.faults = f
    }

    /// One-shot frame faults on the primary→secondary direction (scenarios).
    public func faultNextFrames(corrupt: Int = 0, atByte: Int? = nil, duplicate: Int = 0, reorder: Int = 0, lose: Int = 0) {
        toSecondary.corruptNext += corrupt
        if let atByte { toSecondary.corruptNextAtByte = atByte }
        toSecondary.duplicateNext += duplicate
        toSecondary.reorderNext += reorder
        toSecondary.loseNext += lose
    }

    func count(_ what: String) { faultsInjected[what, default: 0] += 1 }

    func lostPrimary() {
        guard primaryLostAtNanos == nil else { return }
        primaryLostAtNanos = now
        // A secondary that already judged this silence (it said it cannot take over before the
        // primary was finally lost, seed 3984) has said all it will: that report stands.
        if case .primarySilent? = secondary?.node.machine.state {} else { cannotTakeOverReported = false }
        secondaryCouldResumeAtLoss = secondary.map { ($0.replica?.isResumable ?? false) && $0.resumed == nil } ?? false
        incarnationAtLoss = secondary?.incarnation ?? 0
    }

    // MARK: - Trace

    /// The trace is bounded: past `traceLimit` events only notable ones are kept, past twice
    /// that none, and the last line says how many were dropped.
    static let traceLimit = 200_000

    func note(_ node: String, _ text: String, notable: Bool = false) {
        if trace.count >= Self.traceLimit && (!notable || trace.count >= 2 * Self.traceLimit) {
            traceDropped += 1
            return
        }
        trace.append(TraceEvent(atNanos: now, node: node, text: text, notable: notable))
    }

    func violate(_ promise: Promise, _ message: String, onceAs key: String? = nil) {
        if let key { guard reported.insert(key).inserted else { return } }
        violations.append(Violation(promise: promise, atNanos: now, message: message))
        note("check", "VIOLATION \(promise.rawValue): \(message)", notable: true)
    }

    /// A broken promise the missing arbitration explains: counted apart, with its label.
    func knownGap(_ promise: Promise, _ message: String, onceAs key: String) {
        guard reported.insert(key).inserted else { return }
        knownGaps.append(Violation(promise: promise, atNanos: now, message: "\(message) [known gap: \(knownGapLabel)]"))
        note("check", "KNOWN GAP \(promise.rawValue) (\(knownGapLabel)): \(message)", notable: true)
    }

    func newConnection() -> UInt64 {
        nextConnection += 1
        return nextConnection
    }
}

/// What the guest looked like when the primary captured one epoch.
struct CapturedState {
    var memoryDigest: UInt64
    var deviceStateDigest: UInt64
    /// The guest's whole disk (the digest of no bytes for a guest without one).
    var diskDigest: UInt64
    var counter: UInt64
    var outputSequence: UInt64
}

func digest(_ m: PageMemory) -> UInt64 {
    var d = ContentDigest()
    d.add(UnsafeRawBufferPointer(start: m.base, count: m.byteCount))
    return d.value
}

func digest(_ bytes: [UInt8]) -> UInt64 {
    var d = ContentDigest()
    bytes.withUnsafeBytes { d.add($0) }
    return d.value
}
