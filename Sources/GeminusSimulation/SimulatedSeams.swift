import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication

// The world's side of the nodes' seams: a simulated clock, link, dialer, acceptor, witness link,
// lease, guest and output destination. The nodes (`PrimaryNode`, `SecondaryNode`) are the very
// ones the agents run; only what lies below the seams is simulated here.

/// The run's monotonic clock, as the nodes read it.
final class WorldClock: NodeClock, @unchecked Sendable {
    unowned let world: PairSimulator
    init(_ world: PairSimulator) { self.world = world }
    var nowNanos: UInt64 { world.now }
}

/// One end of a simulated connection. Frames the node sends wait in `sendQueue` for room on the
/// link (the world moves them each step, like a kernel's socket buffer); bytes that arrive are
/// decoded here. Heartbeats are the link's business, as on TCP.
final class WorldLink: PeerLink {
    unowned let world: PairSimulator
    unowned let host: SimHost
    let id: UInt64
    var decoder = FrameDecoder()
    var sendQueue: [(bytes: [UInt8], lastOfEpoch: Epoch?)] = []
    var sendHead = 0
    var sendQueueBytes = 0
    var lastHeardNanos: UInt64
    var lastSentNanos: UInt64
    var closed = false
    /// Set when the other side closed or reset the connection.
    var brokenReason: String?
    /// With a `.duringSend` crash armed: frames of the current epoch queued so far, and how many
    /// may go before the host dies.
    private var tornEpoch: (epoch: Epoch, sent: Int, keep: Int)?

    init(world: PairSimulator, host: SimHost, id: UInt64) {
        self.world = world
        self.host = host
        self.id = id
        lastHeardNanos = world.now
        lastSentNanos = world.now
    }

    var remoteAddress: String { "connection \(id)" }
    /// What the secondary said in its handshake (set by the dialer when the dial is accepted).
    var peerHoldsCheckpoint = true
    var isLive: Bool { !closed && host.isAlive }

    func send(_ frame: [UInt8]) throws(GeminusError) {
        guard isLive else { throw GeminusError(.connectionFailed, "connection \(id) is closed") }
        let parsed: FrameHeader? = frame.withUnsafeBytes { buf in (try? FrameCodec.parseHeader(buf))?.0 }
        guard let header = parsed else { preconditionFailure("the node sent a frame that is not one") }
        if host.armedCrash == .duringSend, let primary = host as? SimPrimaryHost {
            if header.kind == .epochBegin { tornEpoch = (header.epoch, 0, 1 + Int(world.worldRandom.next() % 4)) }
            if var t = tornEpoch, t.epoch == header.epoch {
                // At least the begin frame and never the end: a torn epoch.
                if header.kind == .epochEnd || t.sent >= t.keep {
                    world.flush(self)
                    world.crashPrimary(primary, "while sending epoch \(header.epoch) (\(t.sent) frames sent)")
                    return
                }
                t.sent += 1
                tornEpoch = t
            }
        }
        let last: Epoch? = header.kind == .epochEnd ? header.epoch : nil
        sendQueue.append((frame, last))
        sendQueueBytes += frame.count
        if let p = host as? SimPrimaryHost {
            p.peakSendQueueBytes = max(p.peakSendQueueBytes, sendQueueBytes)
            if last != nil, let d = p.armedFreezeNanos {
                p.armedFreezeNanos = nil
                world.freeze(p, forNanos: d, holding: header.epoch)
            }
        }
    }

    func receive() -> LinkInput {
        guard !closed else { return .broken(reason: "connection \(id) is closed", corruptEpoch: nil) }
        while true {
            do {
                guard let frame = try decoder.next() else { break }
                if frame.kind == .heartbeat { continue }
                return .frame(frame)
            } catch {
                var corrupt: Epoch?
                if case .checksumMismatch(_, let e, _) = error { corrupt = Epoch(e) }
                return .broken(reason: "\(error)", corruptEpoch: corrupt)
            }
        }
        if let reason = brokenReason { return .broken(reason: reason, corruptEpoch: nil) }
        return .idle
    }

    func waitForInput(maxNanos: UInt64) {}
    func flush(maxNanos: UInt64) { world.flush(self) }

    func close() {
        guard !closed else { return }
        closed = true
        if host.isAlive && brokenReason == nil { world.sendPacket(from: host, .close(connection: id)) }
    }

    func arrived(_ bytes: [UInt8]) {
        decoder.feed(bytes)
        lastHeardNanos = world.now
    }
}

/// The primary's dialer: hello, then accepted or refused, with a timeout, over the simulated link.
final class WorldDialer: PeerDialer {
    enum State: Equatable {
        case idle(redialAtNanos: UInt64)
        case dialing(UInt64, sinceNanos: UInt64)
        case up
        case stopped
    }
    unowned let world: PairSimulator
    unowned let host: SimPrimaryHost
    var state: State = .idle(redialAtNanos: 0)
    var ready: WorldLink?

    init(world: PairSimulator, host: SimPrimaryHost) {
        self.world = world
        self.host = host
    }

    func take() -> (any PeerLink)? {
        defer { ready = nil }
        return ready
    }

    func redial() { if state != .stopped { state = .idle(redialAtNanos: world.now + world.config.redialNanos) } }
    func stop() { state = .stopped }

    /// The dialling side of the world's step.
    func step(generation: Generation) {
        switch state {
        case .idle(let at) where world.now >= at:
            let c = world.newConnection()
            state = .dialing(c, sinceNanos: world.now)
            world.sendPacket(from: host, .hello(connection: c, generation: generation.rawValue))
            world.note("primary", "dials (connection \(c), generation \(generation))")
        case .dialing(_, let since) where world.now - since >= world.config.dialTimeoutNanos:
            world.note("primary", "dial unanswered for \(world.config.dialTimeoutNanos / 1_000_000) ms")
            state = .idle(redialAtNanos: world.now)
        default:
            break
        }
    }

    func answered(_ packet: LinkPacket) {
        switch packet {
        case .accepted(let c):
            guard case .dialing(c, _) = state else { return }
            let link = WorldLink(world: world, host: host, id: c)
            link.peerHoldsCheckpoint = world.acceptedHolding.removeValue(forKey: c) ?? true
            host.link = link
            ready = link
            state = .up
        case .refused(let c, let reason):
            guard case .dialing(c, _) = state else { return }
            world.staleDialsRefused += 1
            world.note("primary", "refused by the secondary: \(reason)", notable: world.staleDialsRefused <= 1)
            state = .idle(redialAtNanos: world.now + 5 * world.config.redialNanos)
        default:
            break
        }
    }
}

/// The secondary's acceptor: judges each hello with the node's own admission rule.
final class WorldAcceptor: PeerAcceptor {
    unowned let world: PairSimulator
    unowned let host: SimSecondaryHost
    var stopped = false
    var ready: (link: any PeerLink, peer: AdmissionRequest)?

    init(world: PairSimulator, host: SimSecondaryHost) {
        self.world = world
        self.host = host
    }

    func take() -> (link: any PeerLink, peer: AdmissionRequest)? {
        defer { ready = nil }
        return ready
    }

    func stop() { stopped = true }

    func hello(connection c: UInt64, generation: Generation, board: SecondaryAdmission.State) {
        let pages = UInt64(world.primaryPageCount)
        let request = AdmissionRequest(isPrimary: true, vmName: "vm", generation: generation, guestPageCount: pages, platform: GuestPlatform())
        let refusal = stopped ? "this host runs the VM itself and takes no primary (generation \(generation) is stale)"
            : SecondaryAdmission.refusal(of: request, vmName: "vm", expectedPageCount: nil, platform: GuestPlatform(), state: board)
        if let refusal {
            world.sendPacket(from: host, .refused(connection: c, reason: refusal))
            world.note("secondary", "refuses a dial of generation \(generation)", notable: world.staleDialsRefused == 0)
            return
        }
        let link = WorldLink(world: world, host: host, id: c)
        host.link = link
        ready = (link, request)
        // The handshake tells the primary whether this host holds a resumable checkpoint.
        world.acceptedHolding[c] = board.committed != .none
        world.sendPacket(from: host, .accepted(connection: c))
    }
}

/// A node's view of the modelled witness.
final class WorldWitnessLink: WitnessLink, @unchecked Sendable {
    unowned let world: PairSimulator
    let node: SimulatedWitness.Node
    unowned let host: SimHost
    var view: (view: WitnessView, version: UInt64)?

    init(world: PairSimulator, node: SimulatedWitness.Node, host: SimHost) {
        self.world = world
        self.node = node
        self.host = host
    }

    var current: (view: WitnessView, version: UInt64)? { view }
    func announce(_ record: WitnessRecord) { world.hostSays(host) { w in w.witness?.announce(from: self.node, record, now: w.now) } }
    func announceStopped(_ generation: Generation) { world.hostSays(host) { w in w.witness?.announceStopped(generation, now: w.now) } }
    func holdLease() {}
    var lastOwnDeliveryNanos: UInt64? { nil }
}

/// The primary's lease, ticked by the world each step the host runs (its fence-watch thread).
final class WorldLease: LeaseControl {
    unowned let world: PairSimulator
    unowned let host: SimPrimaryHost
    var lease: PrimaryLease

    init(world: PairSimulator, host: SimPrimaryHost, lease: PrimaryLease) {
        self.world = world
        self.host = host
        self.lease = lease
    }

    var unhealthy: String? { lease.unhealthy(world.now) }

    func arm() -> Bool {
        let actions = lease.handle(.soleCopy(false, nowNanos: world.now))
        return !world.leaseActions(actions, host)
    }

    func releaseSoleCopy() {
        let actions = lease.handle(.soleCopy(true, nowNanos: world.now))
        _ = world.leaseActions(actions, host)
    }
}

/// The simulated guest behind the hypervisor seam, run by the world one step at a time while
/// not paused. The crash points of `CrashPoint` that fall inside a capture fire here.
final class SteppedGuest: ProtectedGuest, @unchecked Sendable {
    let guest: SimulatedGuest
    /// Where its output goes: the port of the agent that protects it (a restarted agent brings
    /// its own).
    var port: any GuestOutputPort
    unowned let world: PairSimulator
    weak var host: SimPrimaryHost?
    private(set) var paused = false
    private(set) var stopped = false
    private var justCaptured = false
    /// Scenario faults: the next capture fails (a QMP timeout, a read error), the next resume
    /// fails (`cont` refused).
    var failNextCapture = false
    var failNextResume = false
    /// The last offer of its pending output was refused (the output buffer is full).
    private(set) var stalled = false

    init(guest: SimulatedGuest, port: any GuestOutputPort, world: PairSimulator) {
        self.guest = guest
        self.port = port
        self.world = world
    }

    var pageCount: Int { guest.memory.pageCount }
    var progressCounter: UInt64 { guest.counter }

    func pause() throws(GeminusError) {
        if let h = host, h.armedCrash == .beforeCapture { world.crashPrimary(h, "before capturing epoch \(h.node?.machine.lastCaptured ?? .none)") }
        paused = true
    }

    func resume() throws(GeminusError) {
        if failNextResume {
            failNextResume = false
            throw GeminusError(.hypervisor, "QMP cont failed: the guest stays paused")
        }
        if justCaptured, let h = host, h.armedCrash == .afterCapture {
            world.crashPrimary(h, "after capturing epoch \(h.node?.machine.lastCaptured ?? .none), before sending it")
        }
        justCaptured = false
        paused = false
    }

    func capture(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        precondition(paused, "capture while the guest runs would copy torn pages")
        if failNextCapture {
            failNextCapture = false
            throw GeminusError(.timeout, "QMP query timed out after 2000 ms")
        }
        try guest.capture(full: full, into: buffer)
        justCaptured = true
        recordCapture(buffer)
        if let h = host, h.armedCrash == .duringCapture { world.crashPrimary(h, "while capturing (guest paused)") }
    }

    /// The guest does not run while the world steps its host, so a live round here is exact:
    /// it shows the protocol, not torn pages (the real guests' finders are tested for those).
    /// A guest with a disk gets its first copy paused, as a real one with a replicated disk
    /// does (the disk's first copy rides the full checkpoint).
    var supportsLiveCopy: Bool { guest.workload.diskBlocks == 0 }

    func captureLive(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        try guest.capture(full: full, into: buffer)
        buffer.deviceState = []
        buffer.isLive = true
        recordCapture(buffer)
    }

    /// What the guest looked like at this capture: the replica must equal it once it commits it.
    private func recordCapture(_ buffer: CheckpointBuffer) {
        host?.lastCapture = CapturedState(memoryDigest: digest(guest.memory), deviceStateDigest: digest(buffer.deviceState),
                                          diskDigest: digest(guest.disk), counter: guest.counter, outputSequence: guest.outputSequence)
    }

    func shutdown() { stopped = true }
    var stoppedForGood: Bool { stopped }
    var outputStalled: Bool { stalled && guest.pendingOutput != nil }
    func drainOutput() { if guest.flushOutput(to: port) { stalled = false } }

    /// The world runs the guest for `steps`; false when it stalled on a full output buffer.
    func run(steps: Int) -> Bool {
        guard !paused, !stopped else { return true }
        for _ in 0..<steps {
            if !guest.flushOutput(to: port) {
                stalled = true
                return false
            }
            stalled = false
            guest.step()
        }
        return true
    }
}

/// Where a host's released output goes: to the world's observer and checks, unless the host is
/// dead (nothing of it leaves) or frozen (it leaves when the host thaws).
final class WorldOutput: OutputDestination, @unchecked Sendable {
    unowned let world: PairSimulator
    weak var host: SimHost?
    let resumed: Bool

    init(world: PairSimulator, resumed: Bool) {
        self.world = world
        self.resumed = resumed
    }

    func deliver(_ items: [GuestOutputItem], releasedThrough: Epoch?, generation: Generation) {
        guard let host else { return }
        if let e = releasedThrough, let p = host as? SimPrimaryHost, p.isAlive, p.armedCrash == .afterAck {
            world.crashPrimary(p, "after the ack of epoch \(e), before releasing its output")
        }
        world.hostSays(host) { w in w.released(items, by: host, held: releasedThrough != nil, resumed: self.resumed) }
    }
}
