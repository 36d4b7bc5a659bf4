import GeminusCore
import GeminusHypervisor
import GeminusReplication
import Synchronization

/// Who may connect to a secondary: the rule the acceptor applies to every dial, before the
/// handshake completes, against what the node last published.
public enum SecondaryAdmission {
    /// What the node publishes for its acceptor (which may run on another thread).
    public struct State: Sendable, Equatable {
        public init(generation: Generation, committed: Epoch, runsTheVM: Bool, standbyDown: String? = nil) {
            self.generation = generation
            self.committed = committed
            self.runsTheVM = runsTheVM
            self.standbyDown = standbyDown
        }

        public var generation: Generation
        public var committed: Epoch
        /// The node runs the VM itself now: every dial is a deposed primary.
        public var runsTheVM: Bool
        /// Why the standby is down, while it is: no checkpoint sent here could be resumed.
        public var standbyDown: String?
    }

    /// nil: admit; otherwise why not, said to the dialling primary.
    public static func refusal(of peer: AdmissionRequest, vmName: String, expectedPageCount: Int?, platform: GuestPlatform,
                               state: State) -> String? {
        if !peer.isPrimary { return "only a primary may connect to a secondary" }
        if peer.vmName != vmName { return "this secondary protects '\(vmName)', not '\(peer.vmName)'" }
        if let expectedPageCount, peer.guestPageCount != UInt64(expectedPageCount) {
            let mib = { (pages: UInt64) in (pages * UInt64(GuestPage.size)) >> 20 }
            return "this secondary's standby is set up for \(mib(UInt64(expectedPageCount))) MiB of guest RAM, the primary's guest has \(mib(peer.guestPageCount)) MiB; start the secondary with --ram-mib \(mib(peer.guestPageCount)) (a libvirt standby: define it with the primary's <memory>)"
        }
        let differences = platform.differences(fromPrimary: peer.platform)
        if !differences.isEmpty {
            return "this host's standby cannot resume the primary's checkpoints (\(differences.joined(separator: "; "))); define the standby from the primary's definition (`virsh dumpxml --inactive DOMAIN` there, `virsh define` here) on a host with the same QEMU"
        }
        if state.runsTheVM || peer.generation < state.generation {
            return "generation \(peer.generation) is stale: the pair is at generation \(state.generation) (this primary was deposed)"
        }
        if let why = state.standbyDown {
            return "this secondary's standby reports \(why): it could not take over, so it protects nothing until the standby answers again (see `geminus status` on the secondary's host)"
        }
        return nil
    }
}

/// The node's admission state, for an acceptor on another thread.
public final class AdmissionBoard: Sendable {
    private let value: Mutex<SecondaryAdmission.State>
    public init(_ initial: SecondaryAdmission.State) { value = Mutex(initial) }
    public var state: SecondaryAdmission.State {
        get { value.withLock { $0 } }
        set { value.withLock { $0 = newValue } }
    }
}

/// The standby's health as its watch last found it (any thread): why it is down, or nil.
public final class StandbyHealthBoard: Sendable {
    private let value = Mutex<String?>(nil)
    public init() {}
    public var down: String? {
        get { value.withLock { $0 } }
        set { value.withLock { $0 = newValue } }
    }
}

/// The secondary's role, whole: `SecondaryMachine` and the `Replica`, staging, verifying and
/// applying epochs, acknowledging them, and on a bounded silence (or a planned handover)
/// resuming the standby. Step-driven like `PrimaryNode`; the agent and the simulator step it.
public final class SecondaryNode {
    public struct Settings: Sendable {
        public var vmName: String
        public var machine: SecondaryMachine.Config
        /// The pair's generation as this node knows it: primaries of older generations are refused.
        public var generation: Generation
        /// Guest-physical address of a test guest's progress counter, for reports; nil: none.
        public var counterAddress: Int?
        public var progressIntervalNanos: UInt64

        public init(vmName: String, machine: SecondaryMachine.Config = .init(), generation: Generation = Generation(1),
                    counterAddress: Int? = nil, progressIntervalNanos: UInt64 = 500_000_000) {
            self.vmName = vmName
            self.machine = machine
            self.generation = generation
            self.counterAddress = counterAddress
            self.progressIntervalNanos = progressIntervalNanos
        }
    }

    /// What happened when the standby was resumed; the new primary runs `guest` with `port`.
    public struct Takeover {
        public var fromEpoch: Epoch
        public var generation: Generation
        public var counter: UInt64?
        public var resumeMicros: UInt64
        /// A planned switchover (the primary paused at `fromEpoch` and asked), not a failure.
        public var planned: Bool
        public var guest: any ProtectedGuest
        public var port: HeldOutputPort
        /// The report's fields: these and the guest's own `takeoverFacts`.
        public var report: [String: JSONValue] {
            var r = guest.takeoverFacts
            r["fromEpoch"] = .int(fromEpoch.rawValue)
            r["generation"] = .int(generation.rawValue)
            r["counter"] = counter.map { .int($0) } ?? .null
            r["resumeMicros"] = .int(resumeMicros)
            r["planned"] = .bool(planned)
            return r
        }
    }

    public let settings: Settings
    private let standby: any StandbyHost
    private let clock: any NodeClock
    private let acceptor: any PeerAcceptor
    private let witness: (any WitnessLink)?
    private let events: any NodeEventSink
    private let makePort: (Generation, Epoch) -> HeldOutputPort
    public private(set) var machine: SecondaryMachine
    public private(set) var replica: Replica?
    private var link: (any PeerLink)?
    private var witnessFeed = WitnessFeed()
    public private(set) var framesReceived = 0
    public private(set) var takeover: Takeover?
    /// The role ended without a takeover (a failed resume): the VM is down and said so.
    public private(set) var stopped = false
    /// Read by the acceptor, perhaps from its own thread.
    public let admission: AdmissionBoard
    private var nextProgressNanos: UInt64
    public var progressDue = false
    /// What the standby's health watch last said, from its own thread: acted on at the next step.
    public let standbyHealth = StandbyHealthBoard()

    /// - Parameter makePort: the output port of the guest once resumed here (generation, resumed epoch).
    public init(settings: Settings, standby: any StandbyHost, clock: any NodeClock, acceptor: any PeerAcceptor,
                witness: (any WitnessLink)? = nil, events: any NodeEventSink,
                makePort: @escaping (Generation, Epoch) -> HeldOutputPort) {
        precondition((settings.machine.arbitration == .none) == (witness == nil), "a witness arbitration needs a witness link, and only it")
        self.settings = settings
        self.standby = standby
        self.clock = clock
        self.acceptor = acceptor
        self.witness = witness
        self.events = events
        self.makePort = makePort
        machine = SecondaryMachine(config: settings.machine, generation: settings.generation)
        admission = AdmissionBoard(SecondaryAdmission.State(generation: settings.generation, committed: .none, runsTheVM: false))
        nextProgressNanos = clock.nowNanos
    }

    public var isLinked: Bool { link != nil }
    public var isDone: Bool { takeover != nil || stopped }

    /// One pass: a new primary, its frames, the witness's view, the machine's tick.
    public func step() {
        guard !isDone else { return }
        if let (fresh, peer) = acceptor.take() { adopt(fresh, peer: peer) }
        if let l = link {
            receiveFrames(from: l)
            if !isDone, let l = link { perform(machine.handle(.heardFromPrimary(nowNanos: l.lastHeardNanos))) }
        }
        guard !isDone else { return }
        if let view = witnessFeed.next(from: witness) {
            events.record(.witnessView(view))
            perform(machine.handle(.witness(view, nowNanos: clock.nowNanos)))
        }
        guard !isDone else { return }
        perform(machine.handle(.standbyHealth(down: standbyHealth.down, nowNanos: clock.nowNanos)))
        guard !isDone else { return }
        perform(machine.handle(.tick(nowNanos: clock.nowNanos)))
        publishAdmission()
        let now = clock.nowNanos
        if now >= nextProgressNanos {
            nextProgressNanos = max(nextProgressNanos + settings.progressIntervalNanos, now)
            progressDue = true
        }
    }

    public func waitForInput(maxNanos: UInt64) -> Bool {
        guard let link else { return false }
        link.waitForInput(maxNanos: maxNanos)
        return true
    }

    /// Ends the role without a takeover: no more dials, the link closed.
    public func finish() {
        acceptor.stop()
        if takeover == nil { link?.close(); link = nil }
    }

    private func publishAdmission() {
        // Only a resumable checkpoint counts: the primary copies live to a secondary without one.
        let state = SecondaryAdmission.State(generation: machine.generation,
                                             committed: replica.map { $0.isResumable ? $0.committedEpoch : .none } ?? .none,
                                             runsTheVM: takeover != nil, standbyDown: machine.standbyDown)
        admission.state = state
    }

    private func adopt(_ fresh: any PeerLink, peer: AdmissionRequest) {
        // The acceptor judged the generation against a snapshot; the pair may have moved on
        // since. A deposed primary is refused here too, never adopted.
        if let replica, peer.generation < replica.generation {
            events.record(.primaryRefused(peer: fresh.remoteAddress, generation: peer.generation, pairGeneration: replica.generation))
            fresh.close()
            return
        }
        if replica == nil || replica!.pageCount != Int(peer.guestPageCount) {
            do {
                let memory = try standby.makeReplicaMemory(pageCount: Int(peer.guestPageCount))
                replica = Replica(memory: memory, generation: peer.generation, disk: try standby.makeReplicaDisk())
            } catch {
                events.record(.replicaUnavailable(pages: peer.guestPageCount, "\(error)"))
                fresh.close()
                return
            }
        }
        if link != nil { lose(reason: "a new connection from the primary replaces this one") }
        replica!.adopt(generation: peer.generation)
        link = fresh
        events.record(.primaryConnected(peer: fresh.remoteAddress, generation: peer.generation, pages: peer.guestPageCount))
        perform(machine.handle(.primaryConnected(peer.generation, nowNanos: clock.nowNanos)))
    }

    private func receiveFrames(from l: any PeerLink) {
        while link === l, !isDone, let replica {
            let frame: Frame
            switch l.receive() {
            case .idle: return
            case .broken(let reason, let corruptEpoch):
                if let epoch = corruptEpoch, case .rejected(let e, let r, let detail) = replica.noteCorruptFrame(epoch: epoch) {
                    // The stream is unusable after a bad frame; the epoch is counted as corrupt
                    // and the primary resends everything on its next connection.
                    events.record(.rejected(e, r, detail: detail, keeps: replica.committedEpoch))
                }
                lose(reason: reason)
                return
            case .frame(let f): frame = f
            }
            framesReceived += 1
            perform(machine.handle(.heardFromPrimary(nowNanos: clock.nowNanos)))
            switch frame.kind {
            case .epochBegin, .pages, .deviceState, .diskWrites, .epochEnd:
                let outcome = replica.accept(frame)
                if frame.kind == .epochBegin, outcome == .ignored(.stale) {
                    refuseStale(frame.epoch, replica)
                } else {
                    handle(outcome, replica)
                }
            case .primaryStopped:
                let reason = String(decoding: frame.payload.prefix(Nack.maxDetailBytes), as: UTF8.self)
                perform(machine.handle(.primaryStopped(frame.epoch, reason: reason, nowNanos: clock.nowNanos)))
            case .handover:
                events.record(.handoverRequested(vm: settings.vmName, frame.epoch))
                perform(machine.handle(.handoverRequested(frame.epoch, nowNanos: clock.nowNanos)))
            default:
                lose(reason: "primary sent an unexpected \(frame.kind) frame")
                return
            }
        }
    }

    /// A primary of this generation began an epoch at or below the one committed here: an
    /// earlier run of its agent numbered that far (a restarted agent starts at 1 again), or it
    /// is a duplicate. Ignoring it would leave a restarted primary unacknowledged for good, so
    /// the nack names the newest epoch held here (for `.stale` the nack's epoch is that one):
    /// the primary numbers on after it, and ignores it when it has sent that far itself.
    private func refuseStale(_ epoch: Epoch, _ replica: Replica) {
        events.record(.staleEpoch(epoch, holds: replica.committedEpoch, generation: replica.generation))
        let nack = Nack(reason: .stale, detail: "epoch \(epoch) is not newer than epoch \(replica.committedEpoch), held here")
        send(FrameCodec.encode(FrameHeader(kind: .nack, generation: machine.generation, epoch: replica.committedEpoch), payload: nack.encoded()))
    }

    private func handle(_ outcome: Replica.Outcome, _ replica: Replica) {
        let now = clock.nowNanos
        switch outcome {
        case .staged, .ignored:
            break
        case .committed(let epoch, let stats) where stats.isLive:
            // A round of the live first copy: acknowledged so the primary's window moves on,
            // but no checkpoint the machine may resume (its pages may be torn).
            lastCommitWasLive = true
            events.record(.liveCommitted(epoch, pages: stats.pages, full: stats.isFull))
            send(FrameCodec.encode(FrameHeader(kind: .ack, generation: machine.generation, epoch: epoch)))
        case .committed(let epoch, let stats):
            // The first whole checkpoint: a full epoch, or the pause that ended a live first copy.
            events.record(.committed(epoch, pages: stats.pages, full: stats.isFull || lastCommitWasLive))
            lastCommitWasLive = false
            perform(machine.handle(.committed(epoch, nowNanos: now)))
        case .rejected(let epoch, let reason, let detail):
            events.record(.rejected(epoch, reason, detail: detail, keeps: replica.committedEpoch))
            perform(machine.handle(.rejected(epoch, reason, detail: detail, nowNanos: now)))
        }
    }

    private func lose(reason: String) {
        guard let l = link else { return }
        l.close()
        link = nil
        replica?.abandonStaging(reason: .torn)
        events.record(.linkLost(reason: reason))
        perform(machine.handle(.primaryDisconnected(nowNanos: clock.nowNanos, reason: reason)))
    }

    private func send(_ frame: [UInt8]) {
        guard let l = link else { return }
        do { try l.send(frame) } catch { lose(reason: "\(error)") }
    }

    private func perform(_ actions: [SecondaryMachine.Action]) {
        for action in actions {
            guard !isDone else { return }
            switch action {
            case .acknowledge(let epoch):
                send(FrameCodec.encode(FrameHeader(kind: .ack, generation: machine.generation, epoch: epoch)))
            case .refuse(let epoch, let reason):
                let nack = Nack(reason: reason, detail: "epoch \(epoch) refused")
                send(FrameCodec.encode(FrameHeader(kind: .nack, generation: machine.generation, epoch: epoch), payload: nack.encoded()))
            case .dropLink(let reason):
                lose(reason: reason)
            case .notice(let n):
                switch n {
                case .primaryLost(let reason):
                    events.record(.primaryLost(reason: reason, takeoverAfterMillis: settings.machine.takeoverAfterNanos / 1_000_000,
                                               arbitrated: settings.machine.arbitration != .none))
                case .primaryBack: events.record(.primaryBack)
                case .primaryStopped(let epoch, let reason):
                    events.record(.primarySaysStopped(epoch, reason: reason, arbitrated: settings.machine.arbitration != .none))
                case .cannotTakeOver(let reason): events.record(.cannotTakeOver(vm: settings.vmName, reason: reason))
                case .awaitingArbitration(let reason): events.record(.awaitingArbitration(vm: settings.vmName, reason: reason))
                case .standbyDown(let reason): events.record(.standbyDown(vm: settings.vmName, reason: reason))
                case .standbyBack: events.record(.standbyBack(vm: settings.vmName))
                }
            case .takeOver(let from, let generation):
                takeOver(from: from, generation: generation, planned: false)
            case .acceptHandover(let from, let generation):
                takeOver(from: from, generation: generation, planned: true)
            case .declineHandover(let epoch, let reason):
                events.record(.handoverDeclined(epoch, reason: reason))
                send(FrameCodec.encode(FrameHeader(kind: .handoverDeclined, generation: machine.generation, epoch: epoch),
                                       payload: Array(reason.utf8.prefix(Nack.maxDetailBytes))))
            }
        }
    }

    /// The last commit was a live round: the next resumable one is the first whole checkpoint.
    private var lastCommitWasLive = false

    private func takeOver(from epoch: Epoch, generation: Generation, planned: Bool) {
        guard let replica, replica.isResumable else {
            events.record(.cannotTakeOver(vm: settings.vmName, reason: machine.replicaBroken ?? "the replica holds no whole checkpoint (the first copy was still under way)"))
            stopped = true
            return
        }
        // Stop listening first: an old primary must not be able to reconnect to a node that
        // is about to run the VM itself.
        acceptor.stop()
        admission.state.runsTheVM = true
        // A planned handover keeps the link to answer on it; the primary waits, paused.
        let plannedLink = planned ? link : nil
        if !planned { link?.close() }
        link = nil
        defer {
            plannedLink?.flush(maxNanos: 1_000_000_000)
            plannedLink?.close()
        }
        let t0 = clock.nowNanos
        let counter = settings.counterAddress.map { replica.memory.loadU64(at: $0) }
        let port = makePort(generation, epoch.next)
        do {
            // The disk must be the committed epoch's: a journal of it not yet applied is
            // replayed, and an image that is mid-copy is no checkpoint (the replica says it is
            // resumable only after a paused commit, so this is the disk's own word on it).
            if let disk = replica.disk, case .notResumable = try disk.recover() {
                throw GeminusError(.internalInvariant, "the replica disk is marked mid-copy although the replica holds a whole checkpoint")
            }
            let guest = try standby.resume(memory: replica.memory, deviceState: replica.committedDeviceState, output: port)
            // The resumed guest's writes are new history: its replica must refuse the deposed generation.
            replica.adopt(generation: generation)
            let t = Takeover(fromEpoch: epoch, generation: generation, counter: counter,
                             resumeMicros: (clock.nowNanos - t0) / 1000, planned: planned, guest: guest, port: port)
            if let l = plannedLink {
                try? l.send(FrameCodec.encode(FrameHeader(kind: .handoverDone, generation: generation, epoch: epoch)))
            }
            takeover = t
            events.record(.tookOver(vm: settings.vmName, from: epoch, generation: generation, planned: planned,
                                    resumeMicros: t.resumeMicros, counter: counter))
        } catch {
            if let l = plannedLink {
                // Nothing runs here: the primary may safely run its paused guest on.
                try? l.send(FrameCodec.encode(FrameHeader(kind: .handoverDeclined, generation: generation, epoch: epoch),
                                              payload: Array("resuming the standby failed: \(error)".utf8.prefix(Nack.maxDetailBytes))))
                events.record(.failed("planned switchover failed here (\(error)); the primary keeps running \(settings.vmName)"))
            } else {
                events.record(.resumeFailedDown("\(error)"))
            }
            stopped = true
        }
    }

    public var stateName: String {
        switch machine.state {
        case .waitingForFirstCheckpoint: return "waiting-for-first-checkpoint"
        case .following: return "following"
        case .primarySilent: return "primary-silent"
        case .tookOver: return "took-over"
        }
    }

    public func statusReport() -> [String: JSONValue] {
        progressDue = false
        var fields: [String: JSONValue] = [
            "role": .string("secondary"),
            "vm": .string(settings.vmName),
            "state": .string(stateName),
            "generation": .int(machine.generation.rawValue),
            "linkUp": .bool(link != nil),
            "framesReceived": .int(framesReceived),
        ]
        if let replica {
            fields["committed"] = .int(replica.committedEpoch.rawValue)
            if let a = settings.counterAddress { fields["counter"] = .int(replica.isResumable ? replica.memory.loadU64(at: a) : 0) }
            fields["commits"] = .int(replica.commits)
            fields["rejections"] = .object(Dictionary(uniqueKeysWithValues: replica.rejections.map { ($0.key.description, .int($0.value)) }))
        }
        return fields
    }
}
