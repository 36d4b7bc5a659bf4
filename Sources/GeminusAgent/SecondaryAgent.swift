import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication
import GeminusTransport
import Logging

/// The secondary's glue: the TCP listener and its acceptor thread, the standby's health watch and
/// the status page, around one `SecondaryNode` that it steps. Every rule lives in the node.
public final class SecondaryAgent: @unchecked Sendable {
    public struct Settings: Sendable {
        public var vmName: String
        public var listenHost: String
        public var listenPort: UInt16
        public var keyPath: String
        public var machine: SecondaryMachine.Config
        /// Guest-physical address of a test guest's progress counter (reports only); nil: none.
        public var counterAddress: Int?
        public var progressIntervalMillis: Int
        /// The pair's generation as this node knows it (after a switchover, the generation the
        /// new primary runs as): primaries of older generations are refused.
        public var generation: Generation

        public init(vmName: String, listenHost: String, listenPort: UInt16, keyPath: String,
                    machine: SecondaryMachine.Config = .init(), counterAddress: Int? = nil,
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

    public typealias Takeover = SecondaryNode.Takeover

    private let settings: Settings
    private let standby: any StandbyHost
    private let logger: Logger
    private let events: EventLog
    private let listener: TCPListener
    private let key: PairKey
    private let stopFlag = StopFlag()
    private let witness: (any WitnessLink)?
    /// What `geminus status` shows; the caller may serve it on a control socket.
    public let status: AgentStatus
    /// Told (on the agent's loop) when a primary of a newer generation was let in.
    public var generationChanged: ((Generation) -> Void)?

    public var boundPort: UInt16 { listener.port }

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
    }

    public func stop() { stopFlag.set() }

    /// Follows the primary until `stop()`, the deadline, or a takeover. On takeover it returns
    /// the resumed guest, its output port and where it resumed from; the caller runs it as a primary.
    public func run(deadlineNanos: UInt64 = .max, makePort: @escaping (Generation, Epoch) -> HeldOutputPort) -> Takeover? {
        let sink = AgentEventSink(logger: logger, events: events)
        let acceptor = Acceptor(listener: listener, key: key, vmName: settings.vmName, expectedPageCount: standby.expectedPageCount,
                                platform: standby.platform, logger: logger, sendTimeoutMillis: 1000)
        let node = SecondaryNode(
            settings: .init(vmName: settings.vmName, machine: settings.machine, generation: settings.generation,
                            counterAddress: settings.counterAddress, progressIntervalNanos: UInt64(settings.progressIntervalMillis) * 1_000_000),
            standby: standby, clock: MonotonicClock(), acceptor: acceptor, witness: witness, events: sink, makePort: makePort)
        sink.record(.listening(vm: settings.vmName, host: settings.listenHost, port: Int(listener.port)))
        acceptor.start(board: node.admission)
        let health = StandbyHealthWatch(standby: standby, status: status, intervalMillis: max(settings.progressIntervalMillis, 1000)) { [board = node.standbyHealth] down in
            board.down = down
        }
        defer {
            node.finish()
            health.stop()
        }
        var generation = settings.generation
        while !stopFlag.isSet && Monotonic.nanos() < deadlineNanos && !node.isDone {
            node.step()
            if node.machine.generation != generation, node.takeover == nil {
                generation = node.machine.generation
                generationChanged?(generation)
            }
            if node.progressDue {
                var fields = node.statusReport().mapValues(\.any)
                fields["listen"] = "\(settings.listenHost):\(listener.port)"
                status.update(fields)
                events.emit(.progress, fields)
            }
            if node.isDone { break }
            if !node.waitForInput(maxNanos: 1_000_000) { Monotonic.sleep(nanos: 1_000_000) }
        }
        if node.stopped { stopFlag.set() }
        return node.takeover
    }
}

/// Asks the standby how it is about once a second on its own thread, so a standby QEMU or
/// libvirt that hangs delays `geminus status`, never the apply loop (and so never the acks
/// the primary's held output waits for). What it finds also goes to the node (`down`): a
/// standby that is DOWN could not take over, and the primary must not count on it.
final class StandbyHealthWatch: @unchecked Sendable {
    private let stopFlag = StopFlag()

    init(standby: any StandbyHost, status: AgentStatus, intervalMillis: Int, down: @escaping @Sendable (String?) -> Void) {
        let t = Thread { [stopFlag] in
            var downInARow = 0
            while !stopFlag.isSet {
                let health = standby.checkHealth()
                status.update(health)
                // Twice in a row: one slow answer (a loaded host, a standby QEMU still starting)
                // must not cost the primary its protection and a full resync.
                let reason = Self.downReason(health)
                downInARow = reason == nil ? 0 : downInARow + 1
                down(downInARow >= Self.downChecksBeforeActing ? reason : nil)
                let until = Monotonic.nanos() + UInt64(intervalMillis) * 1_000_000
                while !stopFlag.isSet && Monotonic.nanos() < until { Monotonic.sleep(nanos: 20_000_000) }
            }
        }
        t.name = "geminus-standby-health"
        t.start()
    }

    func stop() { stopFlag.set() }

    static let downChecksBeforeActing = 2

    /// Why the standby is down, from what it said of itself (`geminus status` shows the same word).
    static func downReason(_ health: [String: String]) -> String? {
        guard let state = health["standby"], state.hasPrefix("DOWN") else { return nil }
        return state
    }
}

/// Accepts primaries on a background thread (a handshake can take a while and must not stall
/// the apply loop), judging each with `SecondaryAdmission` against what the node publishes.
final class Acceptor: PeerAcceptor, @unchecked Sendable {
    private let listener: TCPListener
    private let key: PairKey
    private let vmName: String
    private let expectedPageCount: Int?
    private let platform: GuestPlatform
    private let logger: Logger
    private let sendTimeoutMillis: Int
    private let handoff = ConnectionHandoff()

    init(listener: TCPListener, key: PairKey, vmName: String, expectedPageCount: Int?, platform: GuestPlatform, logger: Logger,
         sendTimeoutMillis: Int) {
        self.listener = listener
        self.key = key
        self.vmName = vmName
        self.expectedPageCount = expectedPageCount
        self.platform = platform
        self.logger = logger
        self.sendTimeoutMillis = sendTimeoutMillis
    }

    func start(board: AdmissionBoard) {
        let t = Thread { [self] in loop(board: board) }
        t.name = "geminus-acceptor"
        t.start()
    }

    func take() -> (link: any PeerLink, peer: AdmissionRequest)? {
        guard let c = handoff.take() else { return nil }
        return (FramedPeerLink(c, sendTimeoutMillis: sendTimeoutMillis), Self.request(c.peer))
    }

    static func request(_ hello: PeerHello) -> AdmissionRequest {
        AdmissionRequest(isPrimary: hello.role == .primary, vmName: hello.vmName, generation: hello.generation,
                         guestPageCount: hello.guestPageCount, platform: hello.platform)
    }

    func stop() {
        handoff.stop()
        listener.close()
    }

    private func loop(board: AdmissionBoard) {
        while !handoff.isStopped {
            let state = board.state
            let local = PeerHello(role: .secondary, vmName: vmName, generation: state.generation, committedEpoch: state.committed,
                                  guestPageCount: 0, agentVersion: GeminusVersion.current, platform: platform)
            let vmName = self.vmName, expectedPages = expectedPageCount, platform = self.platform
            do {
                guard let c = try listener.accept(key: key, local: local, admit: { peer in
                    SecondaryAdmission.refusal(of: Self.request(peer), vmName: vmName, expectedPageCount: expectedPages,
                                               platform: platform, state: state)
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
