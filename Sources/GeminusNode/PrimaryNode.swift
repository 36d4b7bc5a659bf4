import GeminusCore
import GeminusHypervisor
import GeminusReplication
import Histogram
import Synchronization

/// The primary's role, whole: `PrimaryMachine`, the encoder, the output-commit port, the
/// statistics, and every rule around them (the output-stall pause, the sole-copy refusal, the
/// handover's end, the self-fence procedure). Step-driven: it has no thread and never sleeps;
/// time comes from its clock, the secondary through its dialer and link, the guest through the
/// hypervisor seam. The agent steps it from its loop, the simulator from its world: one driver,
/// both worlds.
public final class PrimaryNode {
    public struct Settings: Sendable {
        public var vmName: String
        /// Where the secondary is dialled (shown in reports); nil: no secondary is configured.
        public var peer: String?
        public var machine: PrimaryMachine.Config
        public var generation: Generation
        public var resumedFrom: Epoch
        public var outputLimitBytes: Int
        public var progressIntervalNanos: UInt64
        /// A sole copy whose lease would fence turns a secondary away and dials it again after this.
        public var soleCopyRedialNanos: UInt64
        /// Report every capture and acknowledgement on the event stream (the demo's exact check).
        public var traceEpochs: Bool

        public init(vmName: String, peer: String?, machine: PrimaryMachine.Config = .init(), generation: Generation = Generation(1),
                    resumedFrom: Epoch = .none, outputLimitBytes: Int = 8 << 20, progressIntervalNanos: UInt64 = 500_000_000,
                    soleCopyRedialNanos: UInt64 = 1_000_000_000, traceEpochs: Bool = false) {
            self.vmName = vmName
            self.peer = peer
            self.machine = machine
            self.generation = generation
            self.resumedFrom = resumedFrom
            self.outputLimitBytes = outputLimitBytes
            self.progressIntervalNanos = progressIntervalNanos
            self.soleCopyRedialNanos = soleCopyRedialNanos
            self.traceEpochs = traceEpochs
        }
    }

    /// How the role ended.
    public enum Outcome: Sendable, Equatable {
        /// Stopped (asked to, or a guest that cannot be checkpointed): the guest is detached by `finish`.
        case stopped
        /// Planned switchover done: the secondary runs the guest from `epoch`, as
        /// `confirmedGeneration` (nil: told to, but its answer was lost with the link); the
        /// guest here was stopped for good.
        case handedOver(Epoch, confirmedGeneration: Generation?)
        /// The lease said this node may lose the VM: the guest was stopped for good and the
        /// output it held dropped.
        case selfFenced(reason: String)
        /// An ordinary stop (an error, or asked to) while the secondary held acknowledged
        /// checkpoint `Epoch`: the guest here was stopped for good, its held output dropped, and
        /// the secondary told to take over (`guestStopped` false: the stop could not be checked,
        /// so nobody was told).
        case stoppedForSecondary(Epoch, reason: String, guestStopped: Bool)
    }

    public let settings: Settings
    public let guest: any ProtectedGuest
    public let port: HeldOutputPort
    private let clock: any NodeClock
    private let dialer: (any PeerDialer)?
    private let witness: (any WitnessLink)?
    private let lease: (any LeaseControl)?
    private let events: any NodeEventSink
    public private(set) var machine: PrimaryMachine
    private let encoder: CheckpointEncoder
    private let buffer: CheckpointBuffer
    private var link: (any PeerLink)?
    private var witnessFeed = WitnessFeed()
    public private(set) var outcome: Outcome?
    public private(set) var stats = PipelineStats()

    /// Set by `selfFence`, from the fence watch's thread: the loop stops at its next look.
    private let fenceReason = Mutex<String?>(nil)
    private var soleCopyTold: Bool
    private var soleCopyRedialAtNanos: UInt64?
    private var soleCopyThrottle = LogThrottle()
    private var switchoverAsked = false

    // Per-epoch figures that only statistics need (the machine keeps the protocol's state).
    private var pauseStartNanos: [Epoch: UInt64] = [:]
    private var fullEpochsInFlight: Set<Epoch> = []
    private var counterAtCapture: [Epoch: UInt64] = [:]
    public private(set) var lastAcknowledgedCounter: UInt64 = 0
    private var finalPauseStartNanos: UInt64 = 0

    /// Backpressure: after a checkpoint, a guest whose output waits for room in the full output
    /// buffer stays paused until acknowledgements have made room for all of it. Never dropped,
    /// never released early; counted. (A NIC's frames would otherwise pile up in QEMU's own
    /// queue, which drops beyond 10000 frames; the guest runs at most one interval between two
    /// checks, so what waits is at most one epoch's output.)
    private var pausedForOutputSinceNanos: UInt64?
    public private(set) var outputStalls = 0
    private var outputStallNanos: UInt64 = 0

    private var nextProgressNanos: UInt64 = 0
    private var window = (epochs: 0, wireBytes: 0, nanos: UInt64(0))

    public init(settings: Settings, guest: any ProtectedGuest, port: HeldOutputPort, clock: any NodeClock,
                dialer: (any PeerDialer)?, witness: (any WitnessLink)? = nil, lease: (any LeaseControl)? = nil,
                events: any NodeEventSink, maxFramePayload: Int? = nil) throws(GeminusError) {
        precondition((settings.machine.arbitration == .none) == (witness == nil), "a witness arbitration needs a witness link, and only it")
        self.settings = settings
        self.guest = guest
        self.port = port
        self.clock = clock
        self.dialer = dialer
        self.witness = witness
        self.lease = lease
        self.events = events
        var config = settings.machine
        var overridden = false
        // A guest that cannot be copied while it runs gets its first copy paused; one whose
        // disk can only stream while it runs is always copied live.
        if guest.fullCopyMustBeLive {
            guard guest.supportsLiveCopy else {
                throw GeminusError(.invalidArgument, "this guest's disk can only be copied while the guest runs, and its dirty pages cannot be found while it runs",
                                   fix: "use write tracking (--dirty-pages track or auto, with the preload library installed: docs/WRITE-TRACKING.md)")
            }
            if !config.liveFirstCopy { overridden = true }
            config.liveFirstCopy = true
            config.fullCopyMustBeLive = true
        }
        config.liveFirstCopy = config.liveFirstCopy && guest.supportsLiveCopy
        machine = PrimaryMachine(config: config, generation: settings.generation, resumedFrom: settings.resumedFrom)
        if let maxFramePayload {
            encoder = try CheckpointEncoder(pageCount: guest.pageCount, maxFramePayload: maxFramePayload)
        } else {
            encoder = try CheckpointEncoder(pageCount: guest.pageCount)
        }
        buffer = CheckpointBuffer(limitPages: guest.pageCount, initialCapacityPages: min(1024, guest.pageCount))
        soleCopyTold = machine.soleCopy
        let now = clock.nowNanos
        nextProgressNanos = now
        window.nanos = now
        events.record(.primaryStarted(vm: settings.vmName, generation: settings.generation, resumedFrom: settings.resumedFrom,
                                      pages: guest.pageCount, peer: settings.peer))
        if dialer == nil { events.record(.runningUnprotected(vm: settings.vmName, reason: "no secondary configured")) }
        if overridden {
            events.record(.fullCopiesLive(reason: "its disk is over 256 MiB or not raw: it cannot be carried whole in one paused epoch"))
        }
    }

    public var isLinked: Bool { link != nil }
    /// The generation this primary runs as.
    public var generation: Generation { settings.generation }

    /// Asks for a planned switchover; the next step starts it (its end is reported as events).
    public func requestSwitchover() { switchoverAsked = true }

    /// One pass of the epoch loop: switchover requests, a new link, frames from the secondary,
    /// the witness's view, the machine's tick, reports.
    public func step() {
        guard outcome == nil else { return }
        if checkFenced() { return }
        if switchoverAsked {
            switchoverAsked = false
            events.record(.switchoverRequested)
            execute(machine.handle(.switchoverRequested(nowNanos: clock.nowNanos)))
        }
        if link == nil, let fresh = dialer?.take() { adopt(fresh) }
        if let l = link {
            execute(machine.handle(.heardFromPeer(nowNanos: l.lastHeardNanos)))
            receiveFrames(from: l)
        }
        guard outcome == nil else { return }
        if let view = witnessFeed.next(from: witness) {
            events.record(.witnessView(view))
            execute(machine.handle(.witness(view, nowNanos: clock.nowNanos)))
        }
        if checkFenced() || outcome != nil { return }
        execute(machine.handle(.tick(nowNanos: clock.nowNanos)))
        if machine.soleCopy != soleCopyTold {
            soleCopyTold = machine.soleCopy
            if soleCopyTold { lease?.releaseSoleCopy() }
        }
        let now = clock.nowNanos
        if let t = soleCopyRedialAtNanos, now >= t {
            soleCopyRedialAtNanos = nil
            dialer?.redial()
        }
        if now >= nextProgressNanos {
            // After a stall, report once and move on rather than in a burst.
            nextProgressNanos = max(nextProgressNanos + settings.progressIntervalNanos, now)
            progressDue = true
        }
    }

    /// Set when a progress report is due; the driver reads `statusReport` and clears it.
    public var progressDue = false

    /// Waits at most `maxNanos` for the secondary to say something; false when there is no link
    /// to wait on (the driver sleeps instead).
    public func waitForInput(maxNanos: UInt64) -> Bool {
        guard let link else { return false }
        link.waitForInput(maxNanos: maxNanos)
        return true
    }

    /// Ends the role: the link closed, the dialer stopped, and the guest detached unless it was
    /// handed over or fenced (stopped for good then). `stopRequested`: an ordinary stop (SIGTERM),
    /// which hands the VM to a secondary that holds an acknowledged checkpoint (`stopForSecondary`)
    /// rather than leaving it down (a guest the agent started) or running beside the secondary's
    /// (an operator's domain, which the secondary resumes once the link goes quiet). Returns how
    /// the role ended.
    @discardableResult
    public func finish(stopRequested: Bool = false) -> Outcome {
        if outcome == nil { _ = checkFenced() }
        if outcome == nil && stopRequested { endRole(reason: "the agent was asked to stop", guestPaused: false) }
        dialer?.stop()
        link?.close()
        link = nil
        if let outcome { return outcome }
        guest.detach()
        outcome = .stopped
        return .stopped
    }

    /// An ordinary stop: an error that ends the role, or a stop request. While the secondary
    /// holds an acknowledged checkpoint, the VM goes on there (`stopForSecondary`); otherwise the
    /// guest is let go as at any stop (`detach`), run again first if `guestPaused`.
    private func endRole(reason: String, guestPaused: Bool) {
        guard outcome == nil, !checkFenced() else { return }
        if link != nil, case .protected = machine.protection {
            stopForSecondary(reason: reason)
            return
        }
        if guestPaused {
            // Said loudly: a guest left paused with no agent is down, though nothing else says so.
            do { try guest.resume() } catch {
                events.record(.resumeFailed(vm: settings.vmName, "the guest stays PAUSED with no agent after: \(reason). Resuming it failed: \(error). Resume it by hand (virsh resume, or QMP cont) once the cause is fixed"))
            }
        }
        stop()
    }

    /// Hands the VM to the secondary on an ordinary stop. Held output is dropped first (the
    /// secondary resumes an acknowledged checkpoint; what the guest said after it, it says again
    /// there), then the guest is stopped for good, and only once that stop is checked is the
    /// secondary told (a `primaryStopped` frame) and, with a witness, the cluster (the stop
    /// notice a self-fence publishes): a secondary that resumed beside a guest still running
    /// here would run the VM twice. Stopped, not paused: a paused domain is one `virsh resume`,
    /// or one restart of this agent, away from a second running copy.
    private func stopForSecondary(reason: String) {
        let epoch = machine.lastAcknowledged
        let dropped = port.fence()
        guest.shutdown()
        let stopped = guest.stoppedForGood
        // Set first: nothing the link's end sets off may run the epoch loop again.
        outcome = .stoppedForSecondary(epoch, reason: reason, guestStopped: stopped)
        if stopped, let l = link {
            try? l.send(FrameCodec.encode(FrameHeader(kind: .primaryStopped, generation: settings.generation, epoch: epoch),
                                          payload: Array(reason.utf8.prefix(Nack.maxDetailBytes))))
            l.flush(maxNanos: 1_000_000_000)
            witness?.announceStopped(settings.generation)
            awaitPeerClose(l)
        }
        events.record(.stoppedForSecondary(vm: settings.vmName, epoch, reason: reason, droppedPackets: dropped, guestStopped: stopped))
    }

    /// Stop at the next step (`finish` then detaches the guest).
    public func stop() {
        // A self-fence that came meanwhile (from the fence watch's thread) is how the role
        // ended: the guest is stopped for good, and the agent must stay fenced, not just exit.
        guard outcome == nil, !checkFenced() else { return }
        outcome = .stopped
        guest.detach()
    }

    /// The self-fence procedure: held output dropped first (from here on nothing leaves,
    /// whatever the epoch loop still does), then the guest stopped for good, and the witness told
    /// only once the stop is checked (a wrong "stopped" would let the secondary resume beside a
    /// live copy). Safe from another thread: it touches only the port, the guest and the witness.
    public func selfFence(reason: String) {
        let first = fenceReason.withLock { r -> Bool in
            guard r == nil else { return false }
            r = reason
            return true
        }
        guard first else { return }
        let t0 = clock.nowNanos
        let dropped = port.fence()
        guest.shutdown()
        let micros = (clock.nowNanos - t0) / 1000
        let stopped = guest.stoppedForGood
        events.record(.selfFenced(vm: settings.vmName, generation: settings.generation, reason: reason, droppedPackets: dropped,
                                  stopMicros: micros, guestStopped: stopped))
        // Told only once the stop is checked: the node may rejoin the cluster with its
        // Corosync, and without this word its secondary would never win the VM back.
        if stopped { witness?.announceStopped(settings.generation) }
    }

    /// Waits (bounded) for the secondary to close the link on the stop notice, reading what it
    /// sends meanwhile. Closing first with its acknowledgements unread would make this side's
    /// TCP reset the connection, and a reset discards the notice from the secondary's receive
    /// buffer before its agent reads it.
    private func awaitPeerClose(_ l: any PeerLink, maxWaits: Int = 200) {
        for _ in 0..<maxWaits {
            switch l.receive() {
            case .broken: return
            case .frame: continue
            case .idle: l.waitForInput(maxNanos: 10_000_000)
            }
        }
    }

    private func checkFenced() -> Bool {
        guard let reason = fenceReason.withLock({ $0 }) else { return false }
        if outcome == nil { outcome = .selfFenced(reason: reason) }
        return true
    }

    // MARK: - The link

    private func adopt(_ fresh: any PeerLink) {
        let now = clock.nowNanos
        if let refusal = soleCopyRefusal() {
            // Keep the last copy: a lease that would fence now cannot be armed.
            if let repeats = soleCopyThrottle.admit(refusal, nowNanos: now) {
                events.record(.notProtectingYet(peer: fresh.remoteAddress, reason: refusal, repeats: repeats))
            }
            fresh.close()
            soleCopyRedialAtNanos = now + settings.soleCopyRedialNanos
            return
        }
        link = fresh
        events.record(.connected(peer: fresh.remoteAddress))
        execute(machine.handle(.peerConnected(nowNanos: clock.nowNanos, peerHoldsCheckpoint: fresh.peerHoldsCheckpoint)))
    }

    /// nil when a secondary may be given checkpoints now, else why not. A sole copy arms its
    /// lease first; one whose lease would fence keeps the copy instead: it is the only one, and
    /// arming would stop it.
    private func soleCopyRefusal() -> String? {
        guard let lease, machine.soleCopy else { return nil }
        if let why = lease.unhealthy { return "this node holds the only copy and its cluster view is not sound (\(why))" }
        return lease.arm() ? nil : "the fence watch could not be armed (it fenced, or did not answer)"
    }

    private func receiveFrames(from l: any PeerLink) {
        while link === l, outcome == nil {
            let frame: Frame
            switch l.receive() {
            case .idle: return
            case .broken(let reason, _):
                dropLink(reason: reason)
                return
            case .frame(let f): frame = f
            }
            let now = clock.nowNanos
            switch frame.kind {
            case .ack:
                execute(machine.handle(.acknowledged(frame.epoch, frame.generation, nowNanos: now)))
            case .handoverDone:
                execute(machine.handle(.handoverConfirmed(frame.generation, nowNanos: now)))
            case .handoverDeclined:
                let reason = String(decoding: frame.payload.prefix(Nack.maxDetailBytes), as: UTF8.self)
                execute(machine.handle(.handoverDeclined(reason: reason, nowNanos: now)))
            case .nack:
                let nack = Nack(decoding: frame.payload)
                execute(machine.handle(.refused(frame.epoch, nack?.reason ?? .badRecord, nowNanos: now)))
            default:
                dropLink(reason: "secondary sent an unexpected \(frame.kind) frame")
                return
            }
        }
    }

    private func dropLink(reason: String) {
        guard let l = link else { return }
        l.close()
        link = nil
        guest.abandonLiveCopy()
        events.record(.linkLost(reason: reason))
        execute(machine.handle(.peerDisconnected(nowNanos: clock.nowNanos, reason: reason)))
        dialer?.redial()
    }

    private func send(_ frame: [UInt8]) {
        guard let l = link else { return }
        do { try l.send(frame) } catch { dropLink(reason: "\(error)") }
    }

    // MARK: - Actions

    /// Carries out the machine's actions in order; those a capture leads to queue behind the
    /// rest, so every driver sees one order.
    private func execute(_ actions: [PrimaryMachine.Action]) {
        var pending = actions[...]
        while let action = pending.popFirst() {
            if outcome != nil || checkFenced() { return }
            switch action {
            case .capture(let epoch, let full):
                if capture(epoch, full: full, final: false) { pending += machine.handle(.captured(epoch, nowNanos: clock.nowNanos)) }
            case .copyLive(let epoch, let full):
                if copyLive(epoch, full: full) {
                    pending += machine.handle(.liveCopied(epoch, pages: buffer.pageCount, devicesPending: guest.liveCopyDevicesPending,
                                                          nowNanos: clock.nowNanos))
                }
            case .captureFinal(let epoch):
                if capture(epoch, full: false, final: true) { pending += machine.handle(.captured(epoch, nowNanos: clock.nowNanos)) }
            case .transmit(let epoch, let base):
                transmit(epoch, base: base)
                pending += machine.handle(.transmitted(epoch, nowNanos: clock.nowNanos))
            case .releaseOutput(let epoch):
                released(through: epoch)
            case .releaseAllOutput:
                let n = port.releaseAll()
                events.record(.releasedAll(vm: settings.vmName, packets: n))
                resumeIfOutputHasRoom(force: true)
            case .disconnect(let reason):
                dropLink(reason: reason)
            case .handOver(let epoch):
                events.record(.handoverSent(vm: settings.vmName, epoch))
                // With a witness the secondary resumes only on this notice as well as the frame
                // (no single frame moves the VM). Sent first, so that it is on its way when the
                // frame arrives; the guest stays paused and never runs here again as this generation.
                witness?.announceStopped(settings.generation)
                send(FrameCodec.encode(FrameHeader(kind: .handover, generation: settings.generation, epoch: epoch)))
            case .resumeGuest:
                do { try guest.resume() } catch {
                    events.record(.resumeFailed(vm: settings.vmName, "after the switchover was called off: \(error)"))
                    endRole(reason: "the guest could not be resumed after the switchover was called off (\(error))", guestPaused: false)
                }
            case .finishHandover(let epoch, let generation):
                finishHandover(epoch, confirmedGeneration: generation)
            case .announceUnprotected(let generation, let after):
                events.record(.announceUnprotected(generation: generation, after: after))
                witness?.announce(WitnessRecord(generation: generation, unprotectedAfter: after))
            case .notice(let notice):
                report(notice)
            }
        }
    }

    /// `final`: the switchover's last capture; the guest stays paused. False when the capture
    /// failed (the role is over then: a guest that cannot be paused or read is not protectable).
    private func capture(_ epoch: Epoch, full: Bool, final: Bool) -> Bool {
        let t0 = clock.nowNanos
        if final { finalPauseStartNanos = t0 }
        do {
            try guest.pause()
            let t1 = clock.nowNanos
            try guest.capture(full: full, into: buffer)
            let counter = guest.progressCounter
            counterAtCapture[epoch] = counter
            port.open(epoch: epoch.next, holding: true)
            let t2 = clock.nowNanos
            if final {
                pausedForOutputSinceNanos = nil  // the switchover's pause owns the guest now
            } else if guest.outputStalled {
                if pausedForOutputSinceNanos == nil {
                    pausedForOutputSinceNanos = t2
                    outputStalls += 1
                    if outputStalls == 1 || outputStalls % 100 == 0 {
                        events.record(.outputStalled(vm: settings.vmName, limitBytes: settings.outputLimitBytes, times: outputStalls))
                    }
                }
            } else {
                try guest.resume()
                if let since = pausedForOutputSinceNanos {
                    pausedForOutputSinceNanos = nil
                    outputStallNanos += t2 - since
                }
            }
            let t3 = clock.nowNanos
            record(epoch, full: full, final: final, t0: t0, t1: t1, t2: t2, t3: t3)
            if final {
                events.record(.finalCaptured(epoch, counter: counter, pauseMicros: (t3 - t0) / 1000))
            } else {
                events.record(.captured(epoch, full: full, counter: counter, pages: buffer.pageCount, pauseMicros: (t3 - t0) / 1000,
                                        traced: settings.traceEpochs))
            }
            return true
        } catch {
            events.record(.captureFailed(epoch, "\(error)"))
            endRole(reason: "checkpoint \(epoch) failed: \(error)", guestPaused: true)
            return false
        }
    }

    /// A round of the live first copy, the guest running. False when it failed (the role ends).
    private func copyLive(_ epoch: Epoch, full: Bool) -> Bool {
        let t0 = clock.nowNanos
        do {
            try guest.captureLive(full: full, into: buffer)
        } catch {
            events.record(.captureFailed(epoch, "\(error)"))
            endRole(reason: "live copy round \(epoch) failed: \(error)", guestPaused: false)
            return false
        }
        let micros = (clock.nowNanos - t0) / 1000
        stats.liveRounds += 1
        stats.livePages += buffer.pageCount
        events.record(.liveCopied(epoch, full: full, pages: buffer.pageCount, micros: micros, round: (machine.liveCopy?.rounds ?? 0) + 1))
        return true
    }

    /// The pause that ends a live first copy: it counts with the full copies (its pause and its
    /// commit are the first copy's), not with the steady state.
    private func endsFirstCopy(_ epoch: Epoch) -> Bool {
        if case .syncing(let full) = machine.protection { return full == epoch }
        return false
    }

    private func record(_ epoch: Epoch, full: Bool, final: Bool, t0: UInt64, t1: UInt64, t2: UInt64, t3: UInt64) {
        let full = full || endsFirstCopy(epoch)
        if full {
            _ = stats.fullSyncPauseMicros.record((t3 - t0) / 1000)
        } else {
            _ = stats.pauseMicros.record((t3 - t0) / 1000)
            _ = stats.stopMicros.record((t1 - t0) / 1000)
            if let parts = guest.lastCaptureParts {
                _ = stats.dirtyPagesMicros.record(parts.dirtyPagesNanos / 1000)
                _ = stats.deviceStateMicros.record(parts.deviceStateNanos / 1000)
            }
            if !final { _ = stats.resumeMicros.record((t3 - t2) / 1000) }
        }
        _ = stats.captureMicros.record((t2 - t1) / 1000)
        stats.epochs += 1
        stats.pagesCaptured += buffer.pageCount
        if full { stats.fullEpochs += 1 }
        pauseStartNanos[epoch] = t0
        if full { fullEpochsInFlight.insert(epoch) }
    }

    private func transmit(_ epoch: Epoch, base: Epoch) {
        guard let l = link else { return }
        let t0 = clock.nowNanos
        var progress = buffer.isFull ? FullCopyProgress(epoch: epoch, totalPages: buffer.pageCount, startNanos: t0,
                                                        intervalNanos: settings.progressIntervalNanos) : nil
        if let p = progress { events.record(.fullCopyStarted(epoch, mib: (p.totalPages * GuestPage.size) >> 20)) }
        var frames = 0
        do {
            let s = try encoder.encode(buffer, epoch: epoch, generation: settings.generation, baseEpoch: base, pagesSent: { [clock, events] done in
                guard let line = progress?.report(pagesDone: done, nowNanos: clock.nowNanos) else { return }
                events.record(.fullCopyProgress(text: line.text, fields: line.fields))
            }) { frame in
                frames += 1
                try l.send(frame)
            }
            stats.add(s)
            _ = stats.encodeMicros.record((clock.nowNanos - t0) / 1000)
            events.record(.transmitted(epoch, base: base, frames: frames))
        } catch {
            dropLink(reason: "sending epoch \(epoch) failed: \(error)")
        }
    }

    private func released(through epoch: Epoch) {
        port.release(through: epoch)
        if let start = pauseStartNanos.removeValue(forKey: epoch) {
            let micros = (clock.nowNanos - start) / 1000
            if fullEpochsInFlight.remove(epoch) != nil {
                _ = stats.fullSyncCommitMicros.record(micros)
            } else {
                _ = stats.commitMicros.record(micros)
            }
        }
        // Older epochs were acknowledged together with this one.
        for old in pauseStartNanos.keys where old < epoch { pauseStartNanos.removeValue(forKey: old) }
        for old in fullEpochsInFlight where old < epoch { fullEpochsInFlight.remove(old) }
        for old in counterAtCapture.keys where old < epoch { counterAtCapture.removeValue(forKey: old) }
        lastAcknowledgedCounter = counterAtCapture[epoch] ?? lastAcknowledgedCounter
        events.record(.acknowledged(epoch, traced: settings.traceEpochs))
        resumeIfOutputHasRoom()
    }

    /// `force`: the output is released unheld from now on (unprotected), so it cannot stall.
    private func resumeIfOutputHasRoom(force: Bool = false) {
        guard let since = pausedForOutputSinceNanos, outcome == nil, !checkFenced() else { return }
        guest.drainOutput()
        guard force || !guest.outputStalled else { return }
        pausedForOutputSinceNanos = nil
        outputStallNanos += clock.nowNanos - since
        do { try guest.resume() } catch {
            events.record(.resumeFailed(vm: settings.vmName, "after its output found room: \(error)"))
            endRole(reason: "the guest could not be resumed after its output found room (\(error))", guestPaused: false)
        }
    }

    private func finishHandover(_ epoch: Epoch, confirmedGeneration: Generation?) {
        // Until the confirmation: the secondary resumed the guest before sending it.
        let downMicros = (clock.nowNanos - finalPauseStartNanos) / 1000
        // The guest must never run here again: the secondary runs it (or, unconfirmed, takes
        // over by silence once this side is gone).
        guest.shutdown()
        outcome = .handedOver(epoch, confirmedGeneration: confirmedGeneration)
        events.record(.handedOver(vm: settings.vmName, epoch, confirmedGeneration: confirmedGeneration, pausedMicros: downMicros))
    }

    private func report(_ notice: PrimaryMachine.Notice) {
        switch notice {
        case .protectionEstablished(let e): events.record(.protected(vm: settings.vmName, epoch: e))
        case .unprotected(let reason): events.record(.unprotected(vm: settings.vmName, reason: reason))
        case .peerLost(let reason): events.record(.peerLost(reason: reason, holdMillis: settings.machine.unprotectAfterNanos / 1_000_000))
        case .resyncing(let e, let reason): events.record(.resyncing(after: e, reason))
        case .continuesAfter(let e): events.record(.continuesAfter(e, generation: settings.generation))
        case .epochDeferred(let n):
            stats.deferredEpochs += 1
            events.record(.epochDeferred(inFlight: n, count: stats.deferredEpochs))
        case .staleAck(let e, let g): events.record(.staleAck(e, g, ours: settings.generation))
        case .switchoverRefused(let reason): events.record(.switchoverRefused(reason))
        case .switchoverAborted(let reason): events.record(.switchoverAborted(vm: settings.vmName, reason))
        case .handoverDeclinedAfterStopNotice(let e, let reason):
            events.record(.handoverDeclinedAfterStopNotice(vm: settings.vmName, e, reason: reason))
        }
    }

    // MARK: - Reports

    public var protectionState: String {
        switch machine.protection {
        case .protected: return "protected"
        case .syncing: return "syncing"
        case .peerLost: return "peer-lost"
        case .unprotected: return "unprotected"
        }
    }

    /// What `geminus status` and the progress events show. Resets the per-window rates.
    public func statusReport() -> [String: JSONValue] {
        progressDue = false
        let now = clock.nowNanos
        let seconds = Double(now - window.nanos) / 1e9
        let snap = port.snapshot
        let pct = { (h: Histogram<UInt64>) -> JSONValue in .object(PipelineStats.percentiles(h).mapValues { .int($0) }) }
        var fields: [String: JSONValue] = [
            "role": .string("primary"),
            "vm": .string(settings.vmName),
            "generation": .int(settings.generation.rawValue),
            "peer": .string(settings.peer ?? "none"),
            "linkUp": .bool(link != nil),
            "state": .string(protectionState),
            "epoch": .int(machine.lastCaptured.rawValue),
            "acknowledged": .int(machine.lastAcknowledged.rawValue),
            "acknowledgedCounter": .int(lastAcknowledgedCounter),
            "counter": .int(guest.progressCounter),
            "epochs": .int(stats.epochs),
            "epochsPerSecond": .double(seconds > 0 ? Double(stats.epochs - window.epochs) / seconds : 0),
            "wireBytes": .int(stats.wireBytes),
            "wireBytesPerSecond": .double(seconds > 0 ? Double(stats.wireBytes - window.wireBytes) / seconds : 0),
            "inputBytes": .int(stats.inputBytes),
            "compressionRatio": .double(stats.compressionRatio),
            "pauseMicros": pct(stats.pauseMicros),
            "fullSyncPauseMicros": pct(stats.fullSyncPauseMicros),
            "stopMicros": pct(stats.stopMicros),
            "dirtyPagesMicros": pct(stats.dirtyPagesMicros),
            "deviceStateMicros": pct(stats.deviceStateMicros),
            "resumeMicros": pct(stats.resumeMicros),
            "commitMicros": pct(stats.commitMicros),
            "fullSyncCommitMicros": pct(stats.fullSyncCommitMicros),
            "epochsInFlight": .int(machine.epochsInFlight),
            "heldPackets": .int(snap.heldCount),
            "heldBytes": .int(snap.heldBytes),
            "outputFullRefusals": .int(snap.fullRefusals),
            "outputLimitBytes": .int(settings.outputLimitBytes),
            "outputStalls": .int(outputStalls),
            "outputStallMillis": .int((outputStallNanos + (pausedForOutputSinceNanos.map { now - $0 } ?? 0)) / 1_000_000),
            "pausedForOutput": .bool(pausedForOutputSinceNanos != nil),
            "framesSent": .int(snap.framesSent),
            "frameSendFailures": .int(snap.frameSendFailures),
            "framesRefused": .int(snap.framesRefused),
            "deferredEpochs": .int(stats.deferredEpochs),
            "liveRounds": .int(stats.liveRounds),
            "livePages": .int(stats.livePages),
        ]
        for (k, v) in guest.statusReport { fields[k] = .string(v) }
        window = (stats.epochs, stats.wireBytes, now)
        return fields
    }
}
