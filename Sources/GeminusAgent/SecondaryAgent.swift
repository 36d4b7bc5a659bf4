import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusReplication
import GeminusTransport
import Logging

/// Drives `SecondaryMachine` and the `Replica` with real I/O: accepts the primary on a TCP
/// listener, stages, verifies and applies epochs, acknowledges them, and on a bounded silence
/// resumes the standby and carries on as an (unprotected) primary.
public final class SecondaryAgent: @unchecked Sendable {
    public struct Settings: Sendable {
        public var vmName: String
        public var listenHost: String
        public var listenPort: UInt16
        public var keyPath: String
        public var machine: SecondaryMachine.Config
        public var counterAddress: Int
        public var progressIntervalMillis: Int
        /// The pair's generation as this node knows it (after a switchover, the generation the
        /// new primary runs as): primaries of older generations are refused.
        public var generation: Generation

        public init(vmName: String, listenHost: String, listenPort: UInt16, keyPath: String,
                    machine: SecondaryMachine.Config = .init(), counterAddress: Int = SimulatedGuest.counterAddress,
                    progressIntervalMillis: Int = 500, generation: Generation = Generation(1)) {
            self.generation = generation
            self.vmName = vmName
            self.listenHost = listenHost
            self.listenPort = listenPort
            self.keyPath = keyPath
            self.machine = machine
            self.counterAddress = counterAddress
            self.progressIntervalMillis = progressIntervalMillis
        }
    }

    /// What happened when the standby was resumed; the new primary's loop is `resumed`.
    public struct Takeover: Sendable {
        public var fromEpoch: Epoch
        public var generation: Generation
        public var counter: UInt64
        public var resumeMicros: UInt64
        public var silenceMicros: UInt64
        /// For test guests (the status-page layout of `SimulatedGuest`): the output sequence
        /// at the checkpoint and the ring of recent outputs, read before the guest ran on.
        public var outputSequence: UInt64
        public var recentOutputs: [OutputRecord]
        /// An output produced but not yet sent at the checkpoint; the resumed guest sends it.
        public var pendingOutputSequence: UInt64?
        /// A planned switchover (the primary paused at `fromEpoch` and asked), not a failure.
        public var planned: Bool
    }

    private let settings: Settings
    private let standby: any StandbyHost
    private let logger: Logger
    private let events: EventLog
    private let listener: TCPListener
    private let key: PairKey
    private var machine: SecondaryMachine
    private var replica: Replica?
    private var connection: FramedConnection?
    private let acceptor: Acceptor
    private let stopFlag = StopFlag()
    private var framesReceived = 0
    private var bytesApplied = 0
    /// What the acceptor thread may read: the pair's generation and committed epoch.
    private let admission = AdmissionState()
    private var makeOutput: ((Generation, Epoch) -> any GuestOutputPort)?
    private var takeover: (Takeover, any ProtectedGuest)?
    /// What `geminus status` shows; the caller may serve it on a control socket.
    public let status: AgentStatus

    public var boundPort: UInt16 { listener.port }

    private let witness: (any WitnessLink)?
    private var witnessFeed = WitnessFeed()

    public init(settings: Settings, standby: any StandbyHost, logger: Logger, events: EventLog,
                status: AgentStatus = AgentStatus(), witness: (any WitnessLink)? = nil) throws(GeminusError) {
        precondition((settings.machine.arbitration == .none) == (witness == nil), "a witness arbitration needs a witness link, and only it")
        self.witness = witness
        self.status = status
        self.settings = settings
        self.standby = standby
        self.logger = logger
        self.events = events
        key = try PairKey.load(path: settings.keyPath)
        listener = try TCPListener(host: settings.listenHost, port: settings.listenPort, logger: logger)
        machine = SecondaryMachine(config: settings.machine, generation: settings.generation)
        acceptor = Acceptor(listener: listener, key: key, vmName: settings.vmName, expectedPageCount: standby.expectedPageCount,
                            platform: standby.platform, logger: logger)
    }

    public func stop() { stopFlag.set() }

    /// Follows the primary until `stop()`, the deadline, or a takeover. On takeover it returns
    /// the resumed guest and where it resumed from; the caller runs it as a primary.
    public func run(deadlineNanos: UInt64 = .max, output: @escaping @Sendable (Generation, Epoch) -> any GuestOutputPort)
        -> (Takeover, any ProtectedGuest)? {
        events.emit("listening", ["host": settings.listenHost, "port": Int(listener.port), "vm": settings.vmName])
        logger.info("waiting for the primary of \(settings.vmName) on \(settings.listenHost):\(listener.port)")
        makeOutput = output
        let admission = self.admission
        acceptor.start { admission.value }
        let health = StandbyHealthWatch(standby: standby, status: status, intervalMillis: max(settings.progressIntervalMillis, 1000))
        var nextProgress = Monotonic.nanos()
        defer {
            acceptor.stop()
            health.stop()
        }
        while !stopFlag.isSet && Monotonic.nanos() < deadlineNanos && takeover == nil {
            if let fresh = acceptor.take() {
                adopt(fresh)
            }
            if let c = connection {
                receiveFrames(from: c)
                if let c = connection {
                    for a in machine.handle(.heardFromPrimary(nowNanos: c.lastHeardNanos)) { perform(a) }
                }
            } else {
                Monotonic.sleep(nanos: 1_000_000)
            }
            if let view = witnessFeed.nextReported(from: witness, logger: logger, events: events) {
                for a in machine.handle(.witness(view, nowNanos: Monotonic.nanos())) { perform(a) }
            }
            for action in machine.handle(.tick(nowNanos: Monotonic.nanos())) { perform(action) }
            admission.value = (machine.generation, replica?.committedEpoch ?? .none)
            if Monotonic.nanos() >= nextProgress {
                // After a stall, report once and move on rather than in a burst.
                nextProgress = max(nextProgress + UInt64(settings.progressIntervalMillis) * 1_000_000, Monotonic.nanos())
                emitProgress()
            }
        }
        if takeover == nil { connection?.close() }
        return takeover
    }

    private func adopt(_ c: FramedConnection) {
        let hello = c.peer
        // The acceptor judged the generation against a snapshot; the pair may have moved on
        // since. A deposed primary is refused here too, never adopted.
        if let replica, hello.generation < replica.generation {
            logger.warning("refused primary \(c.remoteAddress): generation \(hello.generation) is older than the pair's \(replica.generation)")
            c.close()
            return
        }
        if replica == nil || replica!.pageCount != Int(hello.guestPageCount) {
            do {
                let memory = try standby.makeReplicaMemory(pageCount: Int(hello.guestPageCount))
                replica = Replica(memory: memory, generation: hello.generation, disk: try standby.makeReplicaDisk())
            } catch {
                logger.error("cannot hold a replica of \(hello.guestPageCount) pages: \(error)")
                c.close()
                return
            }
        }
        if let old = connection {
            old.close()
            replica?.abandonStaging(reason: .torn)
        }
        replica!.adopt(generation: hello.generation)
        connection = c
        logger.info("primary \(c.remoteAddress) connected (generation \(hello.generation), \(hello.guestPageCount) pages)")
        events.emit("connected", ["peer": c.remoteAddress, "generation": hello.generation.rawValue])
        for a in machine.handle(.primaryConnected(hello.generation, nowNanos: Monotonic.nanos())) { perform(a) }
    }

    private func receiveFrames(from c: FramedConnection) {
        var wait = Duration.milliseconds(1)
        while let replica {
            let frame: Frame?
            do {
                frame = try c.receive(timeout: wait)
            } catch {
                if let epoch = c.closeReason?.corruptEpoch {
                    // The stream is unusable after a bad frame; the epoch is counted as corrupt
                    // and the primary resends everything on its next connection.
                    _ = replica.noteCorruptFrame(epoch: epoch)
                    events.emit("rejected", ["epoch": epoch.rawValue, "reason": RejectReason.corruptFrame.description])
                }
                lose(reason: "\(error)")
                return
            }
            guard let frame else { return }
            wait = .zero
            framesReceived += 1
            switch frame.kind {
            case .epochBegin, .pages, .deviceState, .diskWrites, .epochEnd:
                handle(replica.accept(frame))
            case .handover:
                logger.notice("the primary hands \(settings.vmName) over at checkpoint \(frame.epoch)")
                events.emit("handover-requested", ["epoch": frame.epoch.rawValue])
                for a in machine.handle(.handoverRequested(frame.epoch, nowNanos: Monotonic.nanos())) { perform(a) }
            default:
                lose(reason: "primary sent an unexpected \(frame.kind) frame")
                return
            }
            if connection == nil { return }
        }
    }

    private func handle(_ outcome: Replica.Outcome) {
        let now = Monotonic.nanos()
        switch outcome {
        case .staged:
            break
        case .committed(let epoch, let stats):
            bytesApplied += stats.pages * GuestPage.size
            if stats.isFull {
                logger.info("full checkpoint \(epoch) committed (\(stats.pages) pages); the standby can take over from now on")
                events.emit("base-committed", ["epoch": epoch.rawValue, "pages": stats.pages])
            }
            for a in machine.handle(.committed(epoch, nowNanos: now)) { perform(a) }
        case .rejected(let epoch, let reason, let detail):
            logger.warning("rejected epoch \(epoch) (\(reason)): \(detail); the last committed checkpoint \(replica?.committedEpoch ?? .none) stays")
            events.emit("rejected", ["epoch": epoch.rawValue, "reason": reason.description, "detail": detail])
            for a in machine.handle(.rejected(epoch, reason, nowNanos: now)) { perform(a) }
        case .ignored(let reason):
            logger.debug("ignored a frame: \(reason)")
        }
    }

    private func lose(reason: String) {
        guard let c = connection else { return }
        c.close()
        connection = nil
        replica?.abandonStaging(reason: .torn)
        logger.warning("link to primary lost: \(reason)")
        events.emit("link-lost", ["reason": reason])
        for a in machine.handle(.primaryDisconnected(nowNanos: Monotonic.nanos(), reason: reason)) { perform(a) }
    }

    private func perform(_ action: SecondaryMachine.Action) {
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
                logger.warning("primary lost: \(reason); taking over after \(settings.machine.takeoverAfterNanos / 1_000_000) ms of silence unless it returns\(settings.machine.arbitration == .none ? "" : ", and only once the witness gives this node the VM")")
                events.emit("primary-lost", ["reason": reason])
            case .primaryBack:
                logger.info("primary is back")
            case .cannotTakeOver(let reason):
                logger.error("cannot take over \(settings.vmName): \(reason)")
                events.emit("cannot-take-over", ["reason": reason])
            case .awaitingArbitration(let reason):
                logger.warning("primary silent, not taking over \(settings.vmName) yet: \(reason)")
                events.emit("awaiting-arbitration", ["reason": reason])
            }
        case .takeOver(let from, let generation):
            guard let makeOutput else { preconditionFailure("takeover before run()") }
            takeover = takeOver(from: from, generation: generation, output: makeOutput(generation, from))
        case .acceptHandover(let from, let generation):
            guard let makeOutput else { preconditionFailure("handover before run()") }
            takeover = takeOver(from: from, generation: generation, output: makeOutput(generation, from), planned: true)
        case .declineHandover(let epoch, let reason):
            logger.warning("declined the handover at checkpoint \(epoch): \(reason)")
            events.emit("handover-declined", ["epoch": epoch.rawValue, "reason": reason])
            send(FrameCodec.encode(FrameHeader(kind: .handoverDeclined, generation: machine.generation, epoch: epoch),
                                   payload: Array(reason.utf8.prefix(Nack.maxDetailBytes))))
        }
    }

    private func send(_ frame: [UInt8]) {
        guard let c = connection else { return }
        do { try c.send(frame, timeout: .seconds(1)) } catch { lose(reason: "\(error)") }
    }

    private func takeOver(from epoch: Epoch, generation: Generation, output: any GuestOutputPort,
                          planned: Bool = false) -> (Takeover, any ProtectedGuest)? {
        guard let replica, replica.hasBaseImage else { return nil }
        // Stop listening first: an old primary must not be able to reconnect to a node that
        // is about to run the VM itself.
        acceptor.stop()
        // A planned handover keeps the link to answer on it; the primary waits, paused.
        let plannedLink = planned ? connection : nil
        if !planned { connection?.close() }
        connection = nil
        defer { try? plannedLink?.flush(timeout: .seconds(1)); plannedLink?.close() }
        let t0 = Monotonic.nanos()
        let counter = replica.memory.loadU64(at: settings.counterAddress)
        let history = TestGuestHistory(memory: replica.memory, deviceState: replica.committedDeviceState)
        do {
            let guest = try standby.resume(memory: replica.memory, deviceState: replica.committedDeviceState, output: output)
            let t = Takeover(fromEpoch: epoch, generation: generation, counter: counter,
                             resumeMicros: (Monotonic.nanos() - t0) / 1000,
                             silenceMicros: planned ? 0 : settings.machine.takeoverAfterNanos / 1000,
                             outputSequence: history.outputSequence, recentOutputs: history.recent,
                             pendingOutputSequence: history.pendingSequence, planned: planned)
            if let link = plannedLink {
                try? link.send(FrameCodec.encode(FrameHeader(kind: .handoverDone, generation: generation, epoch: epoch)), timeout: .seconds(1))
            }
            logger.notice("TOOK OVER \(settings.vmName) from checkpoint \(epoch) as generation \(generation)\(planned ? " (planned switchover)" : "") (resume \(t.resumeMicros) us)")
            return (t, guest)
        } catch {
            if let link = plannedLink {
                // Nothing runs here: the primary may safely run its paused guest on.
                try? link.send(FrameCodec.encode(FrameHeader(kind: .handoverDeclined, generation: generation, epoch: epoch),
                                                 payload: Array("resuming the standby failed: \(error)".utf8.prefix(Nack.maxDetailBytes))),
                               timeout: .seconds(1))
                logger.error("planned switchover failed here (\(error)); the primary keeps running \(settings.vmName)")
                events.emit("error", ["message": "handover resume failed: \(error)"])
                stopFlag.set()
                return nil
            }
            logger.critical("resuming the standby failed: \(error); the VM is DOWN")
            events.emit("error", ["message": "resume failed: \(error)"])
            stopFlag.set()
            return nil
        }
    }

    private func emitProgress() {
        let state: String
        switch machine.state {
        case .waitingForFirstCheckpoint: state = "waiting-for-first-checkpoint"
        case .following: state = "following"
        case .primarySilent: state = "primary-silent"
        case .tookOver: state = "took-over"
        }
        var fields: [String: Any] = [
            "role": "secondary",
            "vm": settings.vmName,
            "state": state,
            "generation": machine.generation.rawValue,
            "listen": "\(settings.listenHost):\(listener.port)",
            "linkUp": connection != nil,
            "framesReceived": framesReceived,
        ]
        if let replica {
            fields["committed"] = replica.committedEpoch.rawValue
            fields["counter"] = replica.hasBaseImage ? replica.memory.loadU64(at: settings.counterAddress) : 0
            fields["commits"] = replica.commits
            fields["rejections"] = Dictionary(uniqueKeysWithValues: replica.rejections.map { ($0.key.description, $0.value) })
        }
        status.update(fields)
        events.emit("progress", fields)
    }
}

/// Asks the standby how it is about once a second on its own thread, so a standby QEMU or
/// libvirt that hangs delays `geminus status`, never the apply loop (and so never the acks
/// the primary's held output waits for).
final class StandbyHealthWatch: @unchecked Sendable {
    private let stopFlag = StopFlag()

    init(standby: any StandbyHost, status: AgentStatus, intervalMillis: Int) {
        let t = Thread { [stopFlag] in
            while !stopFlag.isSet {
                status.update(standby.checkHealth())
                let until = Monotonic.nanos() + UInt64(intervalMillis) * 1_000_000
                while !stopFlag.isSet && Monotonic.nanos() < until { Monotonic.sleep(nanos: 20_000_000) }
            }
        }
        t.name = "geminus-standby-health"
        t.start()
    }

    func stop() { stopFlag.set() }
}

/// The generation and committed epoch, published by the apply loop for the acceptor thread.
final class AdmissionState: @unchecked Sendable {
    private let lock = NSLock()
    private var current: (Generation, Epoch) = (Generation(1), .none)
    var value: (Generation, Epoch) {
        get { lock.lock(); defer { lock.unlock() }; return current }
        set { lock.lock(); current = newValue; lock.unlock() }
    }
}

/// Accepts primaries on a background thread (a handshake can take a while and must not stall
/// the apply loop), admitting only the right VM at a current generation.
final class Acceptor: @unchecked Sendable {
    private let listener: TCPListener
    private let key: PairKey
    private let vmName: String
    private let expectedPageCount: Int?
    private let platform: GuestPlatform
    private let logger: Logger
    private let handoff = ConnectionHandoff()

    init(listener: TCPListener, key: PairKey, vmName: String, expectedPageCount: Int?, platform: GuestPlatform, logger: Logger) {
        self.listener = listener
        self.key = key
        self.vmName = vmName
        self.expectedPageCount = expectedPageCount
        self.platform = platform
        self.logger = logger
    }

    func start(state: @escaping @Sendable () -> (Generation, Epoch)) {
        let t = Thread { [self] in loop(state: state) }
        t.name = "geminus-acceptor"
        t.start()
    }

    func take() -> FramedConnection? { handoff.take() }

    func stop() {
        handoff.stop()
        listener.close()
    }

    private func loop(state: @escaping @Sendable () -> (Generation, Epoch)) {
        while !handoff.isStopped {
            let (generation, committed) = state()
            let local = PeerHello(role: .secondary, vmName: vmName, generation: generation, committedEpoch: committed,
                                  guestPageCount: 0, agentVersion: GeminusVersion.current, platform: platform)
            let vmName = self.vmName
            let expectedPages = expectedPageCount
            let platform = self.platform
            do {
                guard let c = try listener.accept(key: key, local: local, admit: { peer in
                    if peer.role != .primary { return "only a primary may connect to a secondary" }
                    if peer.vmName != vmName { return "this secondary protects '\(vmName)', not '\(peer.vmName)'" }
                    if let expectedPages, peer.guestPageCount != UInt64(expectedPages) {
                        let mib = { (pages: UInt64) in (pages * UInt64(GuestPage.size)) >> 20 }
                        return "this secondary's standby is set up for \(mib(UInt64(expectedPages))) MiB of guest RAM, the primary's guest has \(mib(peer.guestPageCount)) MiB; start the secondary with --ram-mib \(mib(peer.guestPageCount)) (a libvirt standby: define it with the primary's <memory>)"
                    }
                    let differences = platform.differences(fromPrimary: peer.platform)
                    if !differences.isEmpty {
                        return "this host's standby cannot resume the primary's checkpoints (\(differences.joined(separator: "; "))); define the standby from the primary's definition (`virsh dumpxml --inactive DOMAIN` there, `virsh define` here) on a host with the same QEMU"
                    }
                    if peer.generation < generation {
                        return "generation \(peer.generation) is stale: the pair is at generation \(generation) (this primary was deposed)"
                    }
                    return nil
                }, timeout: .milliseconds(200)) else { continue }
                guard handoff.offer(c) else { return }
            } catch {
                // The listener already logged the failed handshake with its cause.
                if handoff.isStopped { return }
                logger.debug("handshake failed: \(error)")
            }
        }
    }
}
