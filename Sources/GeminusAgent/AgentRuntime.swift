import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication
import Logging

/// What runs the VM on this host, as the agent's runtime needs it: the guest it protects as the
/// first primary, and a standby for each stretch as the secondary. The CLI builds one from its
/// arguments (simulated, QEMU, or a libvirt domain); the runtime does not know which.
public protocol GuestHost {
    /// The guest to protect as the first primary, its output on `port`.
    func startGuest(port: HeldOutputPort, logger: Logger, events: EventLog) throws -> any ProtectedGuest
    /// A standby for the `serial`-th role this process takes, and what to clean up if no takeover uses it.
    func makeStandby(serial: Int, logger: Logger, events: EventLog) throws -> (standby: any StandbyHost, cleanup: () -> Void)
}

/// One agent process: the role it takes first and every role change after it (a planned
/// switchover makes the primary the secondary; a takeover makes the secondary the primary),
/// the arbitration's waits, and the wiring of a resumed guest. The CLI only parses its
/// arguments into `Settings` and a `GuestHost`.
public final class AgentRuntime {
    public enum Role: String, Sendable { case primary, secondary }

    public struct Settings {
        public var vmName: String
        public var keyPath: String
        public var role: Role
        public var listen: (host: String, port: UInt16)?
        public var peer: (host: String, port: UInt16)?
        /// The primary's machine, without its arbitration (the runtime adds the one in force).
        public var primary: PrimaryMachine.Config
        public var takeoverAfterNanos: UInt64
        public var outputLimitBytes: Int
        public var counterAddress: Int?
        public var traceEpochs: Bool
        public var deadlineNanos: UInt64

        public init(vmName: String, keyPath: String, role: Role, listen: (host: String, port: UInt16)?, peer: (host: String, port: UInt16)?,
                    primary: PrimaryMachine.Config, takeoverAfterNanos: UInt64, outputLimitBytes: Int, counterAddress: Int?,
                    traceEpochs: Bool, deadlineNanos: UInt64) {
            self.vmName = vmName
            self.keyPath = keyPath
            self.role = role
            self.listen = listen
            self.peer = peer
            self.primary = primary
            self.takeoverAfterNanos = takeoverAfterNanos
            self.outputLimitBytes = outputLimitBytes
            self.counterAddress = counterAddress
            self.traceEpochs = traceEpochs
            self.deadlineNanos = deadlineNanos
        }
    }

    /// What one stretch in one role starts from.
    struct RoleRun {
        var role: Role
        var generation = Generation(1)
        /// After a takeover: the running guest, its output port and the checkpoint it resumed from.
        var carried: (guest: any ProtectedGuest, port: HeldOutputPort, resumedFrom: Epoch)?
        /// Counts role changes, so each QEMU this process starts gets its own files.
        var serial = 0
    }

    private let settings: Settings
    private let host: any GuestHost
    private let arbitration: Arbitration
    private let witness: ClusterWitnessLink?
    private let destination: AgentOutputDestination
    private let status: AgentStatus
    private let server: StatusServer
    private let events: EventLog
    private let stopper: StopOnSignal

    public init(settings: Settings, host: any GuestHost, arbitration: Arbitration, witness: ClusterWitnessLink?,
                output: AgentOutputDestination, status: AgentStatus, server: StatusServer, events: EventLog, stopper: StopOnSignal) {
        self.settings = settings
        self.host = host
        self.arbitration = arbitration
        self.witness = witness
        destination = output
        self.status = status
        self.server = server
        self.events = events
        self.stopper = stopper
    }

    private var ended: Bool { stopper.fired || Monotonic.nanos() >= settings.deadlineNanos }

    private var generationFile: GenerationFile { GenerationFile.beside(statusSocket: server.path) }

    /// Runs role after role until stopped, the deadline, or a role that ends the process.
    public func run() throws {
        var run = RoleRun(role: settings.role, generation: try generationFile.startGeneration(for: settings.role))
        // A planned switchover swaps the roles: the old primary follows as the secondary
        // (on --listen), the new primary protects the VM by connecting to it (--peer).
        while true {
            let logger = Logger(label: "geminus.\(run.role.rawValue)")
            status.update(["role": run.role.rawValue, "state": "starting"])
            events.setRole(run.role.rawValue)
            remember(run.generation, logger: logger)
            switch run.role {
            case .primary:
                let outcome = try runPrimary(run, logger: logger)
                if case .selfFenced(let reason) = outcome {
                    if let witness { stayFenced(witness, generation: run.generation, logger: logger) }
                    throw GeminusError(.peerRefused, "\(settings.vmName) self-fenced: \(reason). Its guest here is stopped for good",
                                       fix: "the secondary runs it if it won the witness (geminus status there); this agent stayed fenced until stopped so the secondary could hear that the guest stopped: restart it as --role secondary to protect the VM again")
                }
                // This host's guest no longer runs: nothing from the network is for it.
                destination.deliverInbound(to: nil)
                if case .stoppedForSecondary(_, _, true) = outcome, let witness {
                    awaitStopRecorded(witness, generation: run.generation, logger: logger)
                }
                // An unconfirmed handover (declined, or its answer lost): the secondary resumes
                // on the stop notice sent with it, so the notice must reach the witness before
                // an agent without --listen exits and leaves the cluster.
                if case .handedOver(_, nil) = outcome, let witness {
                    awaitStopRecorded(witness, generation: run.generation, logger: logger)
                }
                guard case .handedOver(_, let generation) = outcome, settings.listen != nil, !ended else { return }
                run = RoleRun(role: .secondary, generation: generation ?? run.generation.next, serial: run.serial + 1)
            case .secondary:
                guard let next = try runSecondary(run, logger: logger), !ended else { return }
                run = next
            }
        }
    }

    private func runPrimary(_ run: RoleRun, logger: Logger) throws -> PrimaryAgent.Outcome {
        let port: HeldOutputPort
        let guest: any ProtectedGuest
        if let carried = run.carried {
            (guest, port) = (carried.guest, carried.port)
        } else {
            port = HeldOutputPort(limitBytes: settings.outputLimitBytes, destination: destination, generation: run.generation, openEpoch: Epoch(1))
            guest = try host.startGuest(port: port, logger: logger, events: events)
            wire(guest, port)
        }
        // Whatever ends the agent, a guest it started goes with it (a QEMU left behind would be
        // a second running copy once the secondary takes over); an operator's domain stays.
        defer { guest.detach() }
        var machine = settings.primary
        machine.arbitration = arbitration
        let agentSettings = PrimaryAgent.Settings(vmName: settings.vmName, peerHost: settings.peer?.host, peerPort: settings.peer?.port ?? 0,
                                                  keyPath: settings.keyPath, machine: machine, generation: run.generation,
                                                  resumedFrom: run.carried?.resumedFrom ?? .none,
                                                  outputLimitBytes: settings.outputLimitBytes, traceEpochs: settings.traceEpochs)
        if let witness { try awaitQuorum(witness) }
        let agent = try PrimaryAgent(settings: agentSettings, guest: guest, port: port, logger: logger, events: events, status: status, witness: witness)
        stopper.onSignal { agent.stop() }
        // A signal that came during the role change (a takeover) is this agent's too.
        if stopper.fired { agent.stop() }
        server.onSwitchover { agent.requestSwitchover() }
        defer { server.onSwitchover(nil) }
        return agent.run(deadlineNanos: settings.deadlineNanos)
    }

    /// Follows the primary; after a takeover, the run that carries the resumed guest as primary.
    private func runSecondary(_ run: RoleRun, logger: Logger) throws -> RoleRun? {
        guard let listen = settings.listen else { preconditionFailure("a secondary needs an address to listen on") }
        let agentSettings = SecondaryAgent.Settings(vmName: settings.vmName, listenHost: listen.host, listenPort: listen.port, keyPath: settings.keyPath,
                                                    machine: .init(takeoverAfterNanos: settings.takeoverAfterNanos, arbitration: arbitration),
                                                    counterAddress: settings.counterAddress, generation: run.generation)
        let (standby, cleanup) = try host.makeStandby(serial: run.serial, logger: logger, events: events)
        let secondary = try SecondaryAgent(settings: agentSettings, standby: standby, logger: logger, events: events, status: status, witness: witness)
        // A primary of a newer generation was let in: a restart of this agent must refuse older ones.
        secondary.generationChanged = { [self] generation in remember(generation, logger: logger) }
        stopper.onSignal { secondary.stop() }
        if stopper.fired { secondary.stop() }
        let limit = settings.outputLimitBytes, destination = self.destination
        guard let takeover = secondary.run(deadlineNanos: settings.deadlineNanos, makePort: { generation, epoch in
            HeldOutputPort(limitBytes: limit, destination: destination, generation: generation, openEpoch: epoch)
        }) else {
            cleanup()
            return nil
        }
        let guest = takeover.guest
        wire(guest, takeover.port)
        events.emit(.tookOver, takeover.report.mapValues(\.any))
        // Carry on as the primary, protected by --peer if given (after a planned switchover the
        // old primary follows there); otherwise the VM runs unprotected, reported loudly.
        status.update(["tookOverFromEpoch": takeover.fromEpoch.rawValue])
        return RoleRun(role: .primary, generation: takeover.generation, carried: (guest, takeover.port, takeover.fromEpoch),
                       serial: run.serial + 1)
    }

    /// A guest that now runs here as the primary's: its disk records writes while output is held,
    /// and frames from the host's network reach it.
    private func wire(_ guest: any ProtectedGuest, _ port: HeldOutputPort) {
        guest.collectDiskWrites { [port] in port.isHolding }
        if let inbound = guest.inboundFrames { destination.deliverInbound(to: inbound) }
    }

    /// After a self-fence: stays in the cluster, saying that this generation's guest stopped
    /// (the fence procedure announced it), until stopped or the run's deadline. The witness
    /// records it; the secondary hears it from the witness or, in a membership without the
    /// witness, from this agent itself. Either lets it win the VM though this node is in the
    /// cluster (its Corosync runs on). Exiting instead would leave such a secondary waiting for
    /// an operator, and a supervisor restarting this agent as primary would boot a fresh guest.
    private func stayFenced(_ link: ClusterWitnessLink, generation: Generation, logger: Logger) {
        logger.notice("telling the cluster that generation \(generation) of \(settings.vmName) stopped here; this agent stays fenced until stopped (then restart it as --role secondary)")
        var said = Monotonic.nanos()
        var recorded = false
        while !ended {
            if !recorded, let g = link.current?.view.stoppedGeneration, g >= generation {
                recorded = true
                logger.notice("the witness recorded that generation \(generation) of \(settings.vmName) stopped here: its secondary may take it over")
            }
            if !recorded && Monotonic.nanos() - said > 30_000_000_000 {
                said = Monotonic.nanos()
                logger.warning("the witness does not know yet that \(settings.vmName) stopped here (\(link.current.map { "\($0.view)" } ?? "no view")); a secondary without word of it cannot take over")
            }
            Monotonic.sleep(nanos: 50_000_000)
        }
    }

    /// Keeps `generation` for a restart of this agent (`GenerationFile`). A failure is said, not
    /// fatal: the pair runs on; only a restart would start at an older generation.
    private func remember(_ generation: Generation, logger: Logger) {
        let file = generationFile
        do throws(GeminusError) {
            if try file.read() == generation { return }
            try file.write(generation)
        } catch {
            logger.error("cannot keep generation \(generation) of \(settings.vmName) for a restart of this agent: \(error); restarted, it would start at an older generation and its peer would refuse it as deposed")
        }
    }

    /// After an ordinary stop that handed the VM to the secondary: the stop notice went out with
    /// it (`PrimaryNode.stopForSecondary`); waits a little for the witness to record it, since a
    /// secondary that never hears it waits for this node to leave the cluster, which it may never
    /// do (Corosync runs on), and the VM would stay down.
    private func awaitStopRecorded(_ link: ClusterWitnessLink, generation: Generation, logger: Logger, timeoutNanos: UInt64 = 3_000_000_000) {
        let deadline = Monotonic.nanos() + timeoutNanos
        while Monotonic.nanos() < deadline {
            if let g = link.current?.view.stoppedGeneration, g >= generation {
                logger.notice("the witness recorded that generation \(generation) of \(settings.vmName) stopped here: its secondary may take it over")
                return
            }
            Monotonic.sleep(nanos: 20_000_000)
        }
        logger.error("the witness has not recorded within \(timeoutNanos / 1_000_000) ms that \(settings.vmName) stopped here (\(link.current.map { "\($0.view)" } ?? "no view")); its secondary takes over only once it hears it or this node leaves the cluster")
    }

    /// A primary starts only inside a quorate partition: outside one it must not run the VM.
    private func awaitQuorum(_ link: ClusterWitnessLink, timeoutNanos: UInt64 = 15_000_000_000) throws {
        let deadline = Monotonic.nanos() + timeoutNanos
        while Monotonic.nanos() < deadline {
            if let v = link.current?.view, v.quorate { return }
            Monotonic.sleep(nanos: 50_000_000)
        }
        throw GeminusError(.timeout, "this node is not quorate after \(timeoutNanos / 1_000_000_000) s (\(link.current.map { "\($0.view)" } ?? "no view from Corosync")), so it may not run \(settings.vmName) as primary",
                           fix: "check that corosync runs on the peer and on the witness host and that they can reach this host (corosync-quorumtool -s)")
    }
}

/// SIGTERM and SIGINT end the agent through its normal path (stop the loop, shut the guest
/// down), instead of the default of dying on the spot and leaving a QEMU behind.
public final class StopOnSignal: @unchecked Sendable {
    private var sources: [DispatchSourceSignal] = []
    private let lock = NSLock()
    private var action: (@Sendable () -> Void)?
    private var _fired = false
    /// A signal arrived: no further role is started.
    public var fired: Bool { lock.withLock { _fired } }

    public init() {
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { [self] in
                lock.lock()
                let a = action
                _fired = true
                lock.unlock()
                a?()
            }
            source.resume()
            sources.append(source)
        }
    }

    /// Replaces what a signal does (the secondary hands over to its primary loop at takeover).
    public func onSignal(_ a: @escaping @Sendable () -> Void) {
        lock.lock()
        action = a
        lock.unlock()
    }
}

/// The pair's generation as this agent last knew it, in a small file beside its status socket
/// (`/run/geminus/VM.generation` by default; `GenerationFile.beside(statusSocket:)`). A restarted
/// agent starts from it: a primary that had taken the VM over (generation 2) and restarts with
/// generation 1 is refused by its secondary as deposed, and never protected again. It lives as
/// long as /run does: across agent restarts, not host reboots.
public struct GenerationFile: Sendable {
    public let path: String

    public init(path: String) { self.path = path }

    /// `/dir/VM.sock` → `/dir/VM.generation`.
    public static func beside(statusSocket: String) -> GenerationFile {
        let base = statusSocket.hasSuffix(".sock") ? String(statusSocket.dropLast(5)) : statusSocket
        return GenerationFile(path: base + ".generation")
    }

    /// nil when there is no file. A file that is no generation (a symlink, too long, not a
    /// positive number) is an error, not generation 1: guessing could depose the pair's primary.
    public func read() throws(GeminusError) -> Generation? {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw GeminusError(.io, "cannot read the generation file \(path): \(String(cString: strerror(errno)))",
                               fix: "remove it if it is not a regular file this agent wrote, then start the agent with the role it should have")
        }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
        let text = n > 0 ? String(decoding: buffer[..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : ""
        guard n > 0, n < buffer.count, let value = UInt64(text), value > 0 else {
            throw GeminusError(.invalidArgument, "the generation file \(path) holds no generation number",
                               fix: "remove it (the agent then starts at generation 1, and a secondary at a later generation refuses it as deposed)")
        }
        return Generation(value)
    }

    /// The generation an agent starting in `role` runs as. A secondary keeps the file's (it
    /// refuses only primaries older than it). A primary takes the next one (1 without a file):
    /// the witness keeps, per generation, its stop notice and its record of unprotected runs,
    /// and the secondary takes over at once on the stop notice of the generation it follows. A
    /// primary restarted at a generation that had stopped (SIGTERM, a handover the secondary
    /// declined) would run under that notice: a link loss would then have the secondary resume
    /// beside it. And a restarted agent numbers its epochs from 1 again, so its record of an
    /// unprotected run in the same generation would not cover the checkpoint the secondary
    /// holds from the earlier agent. The secondary checks records against the generation of its
    /// checkpoint, so a newer primary never makes it look safer.
    public func startGeneration(for role: AgentRuntime.Role) throws(GeminusError) -> Generation {
        let held = try read()
        guard role == .primary else { return held ?? Generation(1) }
        guard let held else { return Generation(1) }
        guard held.rawValue < UInt64.max else {
            throw GeminusError(.invalidArgument, "the generation file \(path) holds the last generation number there is",
                               fix: "stop both agents of the pair, remove the generation files of both, and start them again (the secondary with a fresh replica)")
        }
        return held.next
    }

    /// Replaces the file at once (written aside, synced, renamed over it): a crash leaves the old
    /// generation or the new one, never a torn file.
    public func write(_ generation: Generation) throws(GeminusError) {
        let temporary = "\(path).\(getpid()).tmp"
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw GeminusError(.io, "cannot write the generation file \(temporary): \(String(cString: strerror(errno)))") }
        let failure = writeFully(fd, Array("\(generation.rawValue)\n".utf8))
        let synced = fsync(fd) == 0
        close(fd)
        guard failure == 0, synced, rename(temporary, path) == 0 else {
            let e = failure != 0 ? failure : errno
            unlink(temporary)
            throw GeminusError(.io, "cannot write the generation file \(path): \(String(cString: strerror(e)))")
        }
        let dir = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
    }
}
