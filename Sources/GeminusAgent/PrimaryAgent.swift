import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication
import GeminusTransport
import Logging

/// The primary's glue: the TCP dialer, the fence watch's thread, the control socket's
/// switchover requests and the status page, around one `PrimaryNode` that it steps. Every rule
/// lives in the node (and runs under the simulator too); this only does I/O and waiting.
public final class PrimaryAgent: @unchecked Sendable {
    public struct Settings: Sendable {
        public var vmName: String
        public var peerHost: String?
        public var peerPort: UInt16
        public var keyPath: String
        public var machine: PrimaryMachine.Config
        public var generation: Generation
        public var resumedFrom: Epoch
        public var outputLimitBytes: Int
        public var sendTimeoutMillis: Int
        public var progressIntervalMillis: Int
        /// Emit a `checkpoint` event per capture and an `acknowledged` event per ack (for the
        /// demo's exact continuity check; chatty, so off by default).
        public var traceEpochs: Bool

        public init(vmName: String, peerHost: String?, peerPort: UInt16, keyPath: String,
                    machine: PrimaryMachine.Config = .init(), generation: Generation = Generation(1),
                    resumedFrom: Epoch = .none, outputLimitBytes: Int = 8 << 20, sendTimeoutMillis: Int = 2000,
                    progressIntervalMillis: Int = 500, traceEpochs: Bool = false) {
            self.vmName = vmName
            self.peerHost = peerHost
            self.peerPort = peerPort
            self.keyPath = keyPath
            self.machine = machine
            self.generation = generation
            self.resumedFrom = resumedFrom
            self.outputLimitBytes = outputLimitBytes
            self.sendTimeoutMillis = sendTimeoutMillis
            self.progressIntervalMillis = progressIntervalMillis
            self.traceEpochs = traceEpochs
        }
    }

    public typealias Outcome = PrimaryNode.Outcome

    private let settings: Settings
    private let guest: any ProtectedGuest
    private let port: HeldOutputPort
    private let logger: Logger
    private let events: EventLog
    private let witness: (any WitnessLink)?
    private let dialer: Dialer?
    private let stopFlag = StopFlag()
    private let switchoverRequests = SwitchoverMailbox()
    /// What `geminus status` shows; the caller may serve it on a control socket.
    public let status: AgentStatus

    public init(settings: Settings, guest: any ProtectedGuest, port: HeldOutputPort, logger: Logger, events: EventLog,
                status: AgentStatus = AgentStatus(), witness: (any WitnessLink)? = nil) throws(GeminusError) {
        precondition((settings.machine.arbitration == .none) == (witness == nil), "a witness arbitration needs a witness link, and only it")
        self.settings = settings
        self.guest = guest
        self.port = port
        self.logger = logger
        self.events = events
        self.status = status
        self.witness = witness
        if let host = settings.peerHost {
            let key = try PairKey.load(path: settings.keyPath)
            let hello = PeerHello(role: .primary, vmName: settings.vmName, generation: settings.generation,
                                  committedEpoch: settings.resumedFrom, guestPageCount: UInt64(guest.pageCount),
                                  agentVersion: GeminusVersion.current, platform: guest.platform)
            dialer = Dialer(host: host, port: settings.peerPort, key: key, hello: hello, logger: logger)
        } else {
            dialer = nil
        }
    }

    public func stop() { stopFlag.set() }

    /// Asks the loop for a planned switchover and waits (at most `timeout`) for its outcome.
    /// Called from another thread (the control socket).
    public func requestSwitchover(timeout: Duration = .seconds(60)) -> SwitchoverResult {
        switchoverRequests.request(timeout: timeout)
    }

    /// Runs until `stop()`, `deadlineNanos`, a self-fence, or a planned switchover hands the guest over.
    @discardableResult
    public func run(deadlineNanos: UInt64 = .max) -> Outcome {
        let sink = AgentEventSink(logger: logger, events: events)
        let node: PrimaryNode
        let nodeBox = NodeBox()
        let watch = startFenceWatch(nodeBox)
        defer { watch?.stop() }
        do {
            node = try PrimaryNode(
                settings: .init(vmName: settings.vmName, peer: settings.peerHost.map { "\($0):\(settings.peerPort)" },
                                machine: settings.machine, generation: settings.generation, resumedFrom: settings.resumedFrom,
                                outputLimitBytes: settings.outputLimitBytes,
                                progressIntervalNanos: UInt64(settings.progressIntervalMillis) * 1_000_000, traceEpochs: settings.traceEpochs),
                guest: guest, port: port, clock: MonotonicClock(),
                dialer: dialer.map { TCPPeerDialer($0, sendTimeoutMillis: settings.sendTimeoutMillis) },
                witness: witness, lease: watch, events: sink)
        } catch {
            logger.critical("cannot protect \(settings.vmName): \(error)")
            events.emit(.error, ["message": "\(error)"])
            guest.detach()
            return .stopped
        }
        nodeBox.node = node
        let status = self.status, mailbox = switchoverRequests, stopFlag = self.stopFlag
        sink.also = { event in
            switch event {
            case .switchoverRefused(let reason):
                mailbox.finish(SwitchoverResult(ok: false, message: "switchover refused: \(reason)"))
            case .handoverDeclinedAfterStopNotice(_, let epoch, let reason):
                status.update(["state": "handed-over", "handedOverAt": epoch.rawValue])
                mailbox.finish(SwitchoverResult(
                    ok: false, message: "the secondary declined the handover (\(reason)); this primary's stop notice was already with the witness, so its guest is stopped for good and the secondary resumes checkpoint \(epoch) as soon as its witness shows the notice: see `geminus status` on the secondary",
                    epoch: epoch))
            case .switchoverAborted(_, let reason):
                mailbox.finish(SwitchoverResult(ok: false, message: "switchover called off, the VM runs on here: \(reason)"))
            case .handedOver(let vm, let epoch, let g, let paused):
                status.update(["state": "handed-over", "handedOverAt": epoch.rawValue])
                mailbox.finish(SwitchoverResult(
                    ok: true, message: g == nil
                        ? "handed over at checkpoint \(epoch); the secondary's confirmation was lost with the link (it takes over on its own)"
                        : "handed over at checkpoint \(epoch); the secondary runs \(vm) as generation \(g!)",
                    epoch: epoch, generation: g, guestPausedMicros: paused))
            case .selfFenced(_, _, let reason, _, _, _):
                status.update(["state": "self-fenced", "fenceReason": reason])
                stopFlag.set()
            case .stoppedForSecondary(_, let epoch, let reason, _, let stopped):
                status.update(["state": stopped ? "stopped-for-secondary" : "stopped", "stoppedAt": epoch.rawValue, "stopReason": reason])
            default:
                break
            }
        }
        while !stopFlag.isSet, Monotonic.nanos() < deadlineNanos, node.outcome == nil {
            if switchoverRequests.takeRequest() { node.requestSwitchover() }
            node.step()
            if node.progressDue {
                let fields = node.statusReport().mapValues(\.any)
                status.update(fields)
                events.emit(.progress, fields)
            }
            if node.outcome != nil { break }
            if !node.waitForInput(maxNanos: 1_000_000) { Monotonic.sleep(nanos: 1_000_000) }
        }
        // A stop asked for (SIGTERM) hands the VM to a following secondary; a deadline (tests,
        // the demo) only ends the run.
        let outcome = node.finish(stopRequested: stopFlag.isSet)
        switchoverRequests.finish(SwitchoverResult(ok: false, message: "the agent stopped before the switchover finished"))
        return outcome
    }

    /// With a witness: the watch that stops the guest for good when the witness says so, from
    /// its own thread (see `FenceWatch`): a long capture or a stuck send cannot delay it.
    private func startFenceWatch(_ box: NodeBox) -> FenceWatch? {
        guard let witness, let timings = settings.machine.arbitration.timings else { return nil }
        // A primary that resumed a checkpoint holds the only copy until it connects a secondary.
        let port = self.port
        return FenceWatch(link: witness, timings: timings, soleCopy: settings.resumedFrom != .none) { reason in
            // Before the node exists: nothing leaves from now on, and the node fences at birth.
            if !box.fence(reason: reason) { port.fence() }
        }
    }
}

/// The node, for the fence watch's thread (set once the node exists). A fence that comes
/// before the node is kept and carried out as soon as it is set.
private final class NodeBox: @unchecked Sendable {
    private let lock = NSLock()
    private var _node: PrimaryNode?
    private var pendingFence: String?

    var node: PrimaryNode? {
        get { lock.withLock { _node } }
        set {
            let pending: String? = lock.withLock {
                _node = newValue
                return pendingFence
            }
            if let pending { newValue?.selfFence(reason: pending) }
        }
    }

    /// True when the node was there to fence.
    func fence(reason: String) -> Bool {
        let node: PrimaryNode? = lock.withLock {
            if _node == nil { pendingFence = reason }
            return _node
        }
        node?.selfFence(reason: reason)
        return node != nil
    }
}

/// A flag another thread (a signal handler's watcher, a test) sets to end a loop.
public final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    public init() {}
    public var isSet: Bool { lock.withLock { value } }
    public func set() { lock.withLock { value = true } }
}

public enum GeminusVersion {
    public static let current = "0.1.0"
}
