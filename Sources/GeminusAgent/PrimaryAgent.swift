import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusReplication
import GeminusTransport
import Logging

/// Drives `PrimaryMachine` with real I/O: the guest behind the hypervisor seam, the TCP link
/// to the secondary, the output-commit port. One thread runs the loop, so the machine sees
/// events in one order; the guest's vCPU runs on its own thread, so encoding and sending
/// overlap with guest execution (the guest is paused only inside `capture`).
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

    private let settings: Settings
    private let guest: any ProtectedGuest
    private let port: HeldOutputPort
    private let key: PairKey?
    private let logger: Logger
    private let events: EventLog
    private var machine: PrimaryMachine
    private let encoder: CheckpointEncoder
    private let buffer: CheckpointBuffer
    private var connection: FramedConnection?
    private let dialer: Dialer?
    private var pauseStartNanos: [Epoch: UInt64] = [:]
    /// Epochs captured as full copies: their commit (seconds for a large guest) is kept out of
    /// the steady-state commit figures, as their pause is.
    private var fullEpochsInFlight: Set<Epoch> = []
    private var counterAtCapture: [Epoch: UInt64] = [:]
    public private(set) var stats = PipelineStats()
    private let stopFlag = StopFlag()
    /// What `geminus status` shows; the caller may serve it on a control socket.
    public let status: AgentStatus
    /// The witness engine, with `settings.machine.arbitration` set to `.witness`.
    private let witness: (any WitnessLink)?
    private var witnessFeed = WitnessFeed()
    private let fenced = StopFlag()
    /// What the fence watch was last told about `machine.soleCopy`, and when a secondary turned
    /// away for the sake of the last copy is dialed again.
    private var soleCopyTold = false
    private var soleCopyRedialNanos: UInt64?
    private var soleCopyThrottle = LogThrottle()

    public init(settings: Settings, guest: any ProtectedGuest, port: HeldOutputPort, logger: Logger, events: EventLog,
                status: AgentStatus = AgentStatus(), witness: (any WitnessLink)? = nil) throws(GeminusError) {
        precondition((settings.machine.arbitration == .none) == (witness == nil), "a witness arbitration needs a witness link, and only it")
        self.witness = witness
        self.status = status
        self.settings = settings
        self.guest = guest
        self.port = port
        self.logger = logger
        self.events = events
        machine = PrimaryMachine(config: settings.machine, generation: settings.generation, resumedFrom: settings.resumedFrom)
        encoder = try CheckpointEncoder(pageCount: guest.pageCount)
        buffer = CheckpointBuffer(limitPages: guest.pageCount, initialCapacityPages: 1024)
        if let host = settings.peerHost {
            let key = try PairKey.load(path: settings.keyPath)
            self.key = key
            let hello = PeerHello(role: .primary, vmName: settings.vmName, generation: settings.generation,
                                  committedEpoch: settings.resumedFrom, guestPageCount: UInt64(guest.pageCount),
                                  agentVersion: GeminusVersion.current, platform: guest.platform)
            dialer = Dialer(host: host, port: settings.peerPort, key: key, hello: hello, logger: logger)
        } else {
            key = nil
            dialer = nil
        }
    }

    public func stop() { stopFlag.set() }

    /// How `run` ended.
    public enum Outcome: Sendable, Equatable {
        /// Stopped (signal, deadline, or a guest that cannot be checkpointed): the guest was
        /// detached, not stopped, unless the agent started it itself.
        case stopped
        /// Planned switchover done: the secondary runs the guest from `epoch`, as
        /// `confirmedGeneration` (nil: told to, but its answer was lost with the link); the
        /// guest here was stopped for good.
        case handedOver(Epoch, confirmedGeneration: Generation?)
        /// The witness said this node may lose the VM (or the agent was frozen): the guest was
        /// stopped for good and the output it held dropped.
        case selfFenced(reason: String)
    }

    /// Asks the loop for a planned switchover and waits (at most `timeout`) for its outcome.
    /// Called from another thread (the control socket).
    public func requestSwitchover(timeout: Duration = .seconds(60)) -> SwitchoverResult {
        switchoverRequests.request(timeout: timeout)
    }

    /// Runs until `stop()`, `deadlineNanos`, or a planned switchover hands the guest over.
    @discardableResult
    public func run(deadlineNanos: UInt64 = .max) -> Outcome {
        dialer?.start()
        events.emit("primary-started", ["vm": settings.vmName, "generation": settings.generation.rawValue,
                                        "resumedFrom": settings.resumedFrom.rawValue, "pages": guest.pageCount,
                                        "peer": settings.peerHost.map { "\($0):\(settings.peerPort)" } ?? NSNull()])
        if settings.peerHost == nil {
            logger.warning("\(settings.vmName) runs UNPROTECTED: no secondary is configured")
            events.emit("unprotected", ["reason": "no secondary configured"])
        }
        var nextProgress = Monotonic.nanos()
        var window = ProgressWindow()
        let watch = startFenceWatch()
        soleCopyTold = machine.soleCopy
        defer { watch?.stop() }
        while !stopFlag.isSet {
            let now = Monotonic.nanos()
            if now >= deadlineNanos { break }
            if switchoverRequests.takeRequest() {
                logger.notice("planned switchover of \(settings.vmName) requested")
                events.emit("switchover-requested", [:])
                execute(machine.handle(.switchoverRequested(nowNanos: now)))
            }
            if connection == nil, let fresh = dialer?.take() {
                if let refusal = soleCopyRefusal(watch) {
                    // Keep the last copy: a lease that would fence now cannot be armed.
                    if let repeats = soleCopyThrottle.admit(refusal, nowNanos: now) {
                        logger.warning("not protecting \(settings.vmName) on \(fresh.remoteAddress) yet: \(refusal)\(repeats > 0 ? " (\(repeats) more since)" : "")")
                    }
                    fresh.close()
                    soleCopyRedialNanos = now + 1_000_000_000
                } else {
                    connection = fresh
                    logger.info("connected to secondary \(fresh.remoteAddress); starting full checkpoint")
                    events.emit("connected", ["peer": fresh.remoteAddress])
                    execute(machine.handle(.peerConnected(nowNanos: now)))
                }
            }
            if let c = connection {
                execute(machine.handle(.heardFromPeer(nowNanos: c.lastHeardNanos)))
                receiveFrames(from: c, waitNanos: 1_000_000)
            } else {
                Monotonic.sleep(nanos: 1_000_000)
            }
            if let view = witnessFeed.nextReported(from: witness, logger: logger, events: events) {
                execute(machine.handle(.witness(view, nowNanos: Monotonic.nanos())))
            }
            guard !fenced.isSet else { break }
            execute(machine.handle(.tick(nowNanos: Monotonic.nanos())))
            if machine.soleCopy != soleCopyTold {
                soleCopyTold = machine.soleCopy
                if soleCopyTold { watch?.releaseSoleCopy() }
            }
            if let t = soleCopyRedialNanos, Monotonic.nanos() >= t {
                soleCopyRedialNanos = nil
                dialer?.reconnect()
            }
            if Monotonic.nanos() >= nextProgress {
                // After a stall, report once and move on rather than in a burst.
                nextProgress = max(nextProgress + UInt64(settings.progressIntervalMillis) * 1_000_000, Monotonic.nanos())
                emitProgress(&window)
            }
        }
        dialer?.stop()
        connection?.close()
        switchoverRequests.finish(SwitchoverResult(ok: false, message: "the agent stopped before the switchover finished"))
        if let handedOver = outcome { return handedOver }
        if fenced.isSet, let reason = watch?.reason { return .selfFenced(reason: reason) }
        guest.detach()
        return .stopped
    }

    /// nil when a secondary may be given checkpoints now, else why not. A sole copy arms its
    /// lease first (`FenceWatch.arm`); one whose lease would fence keeps the copy instead: it
    /// is the only one, and arming would stop it.
    private func soleCopyRefusal(_ watch: FenceWatch?) -> String? {
        guard let watch, machine.soleCopy else { return nil }
        if let why = watch.unhealthy { return "this node holds the only copy and its cluster view is not sound (\(why))" }
        return watch.arm() ? nil : "the fence watch could not be armed (\(watch.reason ?? "it did not answer"))"
    }

    /// With a witness: the watch that stops the guest for good when the witness says so, from
    /// its own thread (see `FenceWatch`).
    private func startFenceWatch() -> FenceWatch? {
        guard let witness, let timings = settings.machine.arbitration.timings else { return nil }
        let port = self.port, guest = self.guest, logger = self.logger, events = self.events
        let fenced = self.fenced, stopFlag = self.stopFlag, status = self.status, vm = settings.vmName, generation = settings.generation
        return FenceWatch(link: witness, timings: timings, soleCopy: machine.soleCopy) { reason in
            let t0 = Monotonic.nanos()
            // Output first: from here on nothing leaves, whatever the epoch loop still does.
            let dropped = port.fence()
            fenced.set()
            guest.shutdown()
            let micros = (Monotonic.nanos() - t0) / 1000
            logger.critical("SELF-FENCED \(vm): \(reason). The guest is stopped for good (in \(micros / 1000) ms) and \(dropped) held packets were dropped; the secondary may run it now")
            let stopped = guest.stoppedForGood
            events.emit("self-fenced", ["reason": reason, "droppedPackets": dropped, "stopMicros": micros, "guestStopped": stopped])
            status.update(["state": "self-fenced", "fenceReason": reason])
            // Told only once the stop is checked: the node may rejoin the cluster with its
            // Corosync, and without this word its secondary would never win the VM back.
            if stopped {
                witness.announceStopped(generation)
            } else {
                logger.critical("\(vm): the guest could not be confirmed stopped after the self-fence, so the witness is not told; the secondary will not take over while this node is in the cluster. Check this host (QEMU still running?) and stop the guest by hand")
            }
            stopFlag.set()
        }
    }

    private func receiveFrames(from c: FramedConnection, waitNanos: UInt64) {
        var wait = Duration.nanoseconds(Int64(waitNanos))
        while true {
            let frame: Frame?
            do {
                frame = try c.receive(timeout: wait)
            } catch {
                dropConnection(reason: "\(error)")
                return
            }
            guard let frame else { return }
            wait = .zero
            let now = Monotonic.nanos()
            switch frame.kind {
            case .ack:
                execute(machine.handle(.acknowledged(frame.epoch, frame.generation, nowNanos: now)))
            case .handoverDone:
                execute(machine.handle(.handoverConfirmed(frame.generation, nowNanos: now)))
                if outcome != nil { return }
            case .handoverDeclined:
                let reason = String(decoding: frame.payload.prefix(Nack.maxDetailBytes), as: UTF8.self)
                execute(machine.handle(.handoverDeclined(reason: reason, nowNanos: now)))
            case .nack:
                let nack = Nack(decoding: frame.payload)
                logger.warning("secondary refused epoch \(frame.epoch): \(nack?.reason.description ?? "unreadable nack") \(nack?.detail ?? "")")
                execute(machine.handle(.refused(frame.epoch, nack?.reason ?? .badRecord, nowNanos: now)))
            default:
                dropConnection(reason: "secondary sent an unexpected \(frame.kind) frame")
                return
            }
        }
    }

    private func dropConnection(reason: String) {
        guard let c = connection else { return }
        c.close()
        connection = nil
        logger.warning("link to secondary lost: \(reason)")
        events.emit("link-lost", ["reason": reason])
        execute(machine.handle(.peerDisconnected(nowNanos: Monotonic.nanos(), reason: reason)))
        dialer?.reconnect()
    }

    private func execute(_ actions: [PrimaryMachine.Action]) {
        for action in actions {
            switch action {
            case .capture(let epoch, let full):
                capture(epoch, full: full)
            case .transmit(let epoch, let base):
                transmit(epoch, base: base)
            case .releaseOutput(let epoch):
                _ = port.release(through: epoch)
                if let start = pauseStartNanos.removeValue(forKey: epoch) {
                    let micros = (Monotonic.nanos() - start) / 1000
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
                if settings.traceEpochs { events.emit("acknowledged", ["epoch": epoch.rawValue]) }
                resumeIfOutputHasRoom()
            case .releaseAllOutput:
                let n = port.releaseAll()
                logger.warning("\(settings.vmName) is UNPROTECTED; released \(n) held packets")
                resumeIfOutputHasRoom(force: true)
            case .disconnect(let reason):
                dropConnection(reason: reason)
            case .captureFinal(let epoch):
                capture(epoch, full: false, final: true)
            case .handOver(let epoch):
                logger.notice("secondary acknowledged the final checkpoint \(epoch); handing \(settings.vmName) over")
                events.emit("handover-sent", ["epoch": epoch.rawValue])
                send(FrameCodec.encode(FrameHeader(kind: .handover, generation: settings.generation, epoch: epoch)))
            case .resumeGuest:
                do {
                    try guest.resume()
                } catch {
                    logger.critical("cannot resume \(settings.vmName) after the switchover was called off: \(error)")
                    events.emit("error", ["message": "resume after aborted switchover failed: \(error)"])
                    stopFlag.set()
                }
            case .finishHandover(let epoch, let generation):
                finishHandover(epoch, confirmedGeneration: generation)
            case .announceUnprotected(let generation, let after):
                logger.warning("secondary still lost: asking the witness to record generation \(generation) as unprotected after epoch \(after) before releasing held output")
                events.emit("announce-unprotected", ["generation": generation.rawValue, "after": after.rawValue])
                witness?.announce(WitnessRecord(generation: generation, unprotectedAfter: after))
            case .notice(let notice):
                report(notice)
            }
        }
    }

    private var outcome: Outcome?
    private var finalPauseStartNanos: UInt64 = 0
    private let switchoverRequests = SwitchoverMailbox()

    private func finishHandover(_ epoch: Epoch, confirmedGeneration: Generation?) {
        // Until the confirmation: the secondary resumed the guest before sending it.
        let downMicros = (Monotonic.nanos() - finalPauseStartNanos) / 1000
        // The guest must never run here again: the secondary runs it (or, unconfirmed, takes
        // over by silence once this side is gone).
        guest.shutdown()
        outcome = .handedOver(epoch, confirmedGeneration: confirmedGeneration)
        var fields: [String: Any] = ["epoch": epoch.rawValue, "pausedMicros": downMicros]
        if let g = confirmedGeneration {
            logger.notice("HANDED OVER \(settings.vmName) at checkpoint \(epoch): the secondary runs it as generation \(g) (guest paused \(downMicros / 1000) ms)")
            fields["generation"] = g.rawValue
        } else {
            logger.warning("handed over \(settings.vmName) at checkpoint \(epoch) but the secondary's confirmation was lost with the link; it takes over on its own once it notices the silence. This copy is stopped.")
            fields["generation"] = NSNull()
        }
        events.emit("handed-over", fields)
        status.update(["state": "handed-over", "handedOverAt": epoch.rawValue])
        switchoverRequests.finish(SwitchoverResult(
            ok: true, message: confirmedGeneration == nil
                ? "handed over at checkpoint \(epoch); the secondary's confirmation was lost with the link (it takes over on its own)"
                : "handed over at checkpoint \(epoch); the secondary runs \(settings.vmName) as generation \(confirmedGeneration!)",
            epoch: epoch, generation: confirmedGeneration, guestPausedMicros: downMicros))
        stopFlag.set()
    }

    private func send(_ frame: [UInt8]) {
        guard let c = connection else { return }
        do { try c.send(frame, timeout: .milliseconds(settings.sendTimeoutMillis)) } catch { dropConnection(reason: "\(error)") }
    }

    public private(set) var lastAcknowledgedCounter: UInt64 = 0

    /// Backpressure (the secondary acknowledges more slowly than the guest sends): after a
    /// checkpoint, a guest whose output waits for room in the full output buffer stays paused
    /// until acknowledgements have made room for all of it. Never dropped, never released
    /// early; counted. (A NIC's frames would otherwise pile up in QEMU's own queue, which drops
    /// beyond 10000 frames; the guest runs at most one interval between two checks, so what
    /// waits is at most one epoch's output.)
    private var pausedForOutputSince: UInt64?
    private var outputStalls = 0
    private var outputStallNanos: UInt64 = 0

    /// `force`: the output is released unheld from now on (unprotected), so it cannot stall.
    private func resumeIfOutputHasRoom(force: Bool = false) {
        guard let since = pausedForOutputSince, !fenced.isSet else { return }
        guest.drainOutput()
        guard force || !guest.outputStalled else { return }
        pausedForOutputSince = nil
        outputStallNanos += Monotonic.nanos() - since
        do { try guest.resume() } catch {
            logger.critical("cannot resume \(settings.vmName) after its output found room: \(error); stopping")
            events.emit("error", ["message": "resume after an output stall failed: \(error)"])
            stopFlag.set()
        }
    }

    /// `final`: the switchover's last capture; the guest stays paused.
    private func capture(_ epoch: Epoch, full: Bool, final: Bool = false) {
        guard !fenced.isSet else { return }
        let t0 = Monotonic.nanos()
        if final { finalPauseStartNanos = t0 }
        do {
            try guest.pause()
            let t1 = Monotonic.nanos()
            try guest.capture(full: full, into: buffer)
            counterAtCapture[epoch] = guest.progressCounter
            port.open(epoch: epoch.next, holding: true)
            let t2 = Monotonic.nanos()
            if final {
                pausedForOutputSince = nil  // the switchover's pause owns the guest now
            } else if guest.outputStalled {
                if pausedForOutputSince == nil {
                    pausedForOutputSince = t2
                    outputStalls += 1
                    if outputStalls == 1 || outputStalls % 100 == 0 {
                        logger.notice("\(settings.vmName)'s output buffer is full (\(settings.outputLimitBytes) bytes awaiting acknowledgement): the guest waits paused until the secondary catches up (\(outputStalls) times so far)")
                    }
                }
            } else {
                try guest.resume()
                if let since = pausedForOutputSince {
                    pausedForOutputSince = nil
                    outputStallNanos += t2 - since
                }
            }
            let t3 = Monotonic.nanos()
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
            if settings.traceEpochs {
                events.emit("checkpoint", ["epoch": epoch.rawValue, "counter": counterAtCapture[epoch] ?? 0, "full": full])
            }
            if final {
                events.emit("final-checkpoint", ["epoch": epoch.rawValue, "counter": counterAtCapture[epoch] ?? 0, "pauseMicros": (t3 - t0) / 1000])
            }
        } catch {
            // A guest that cannot be paused or read is not protectable; say so and stop.
            logger.critical("checkpoint \(epoch) failed: \(error); stopping")
            events.emit("error", ["message": "\(error)"])
            try? guest.resume()
            stopFlag.set()
            return
        }
        execute(machine.handle(.captured(epoch, nowNanos: Monotonic.nanos())))
    }

    private func transmit(_ epoch: Epoch, base: Epoch) {
        guard let c = connection else { return }
        let t0 = Monotonic.nanos()
        let timeout = Duration.milliseconds(settings.sendTimeoutMillis)
        var progress = buffer.isFull ? FullCopyProgress(epoch: epoch, totalPages: buffer.pageCount, startNanos: t0,
                                                        intervalNanos: UInt64(settings.progressIntervalMillis) * 1_000_000) : nil
        if let p = progress {
            logger.notice("full checkpoint \(epoch): sending \((p.totalPages * GuestPage.size) >> 20) MiB of guest RAM to the secondary")
        }
        do {
            let s = try encoder.encode(buffer, epoch: epoch, generation: settings.generation, baseEpoch: base, pagesSent: { done in
                guard let line = progress?.report(pagesDone: done, nowNanos: Monotonic.nanos()) else { return }
                logger.notice("\(line.text)")
                events.emit("full-sync-progress", line.fields)
            }) { frame in
                try c.send(frame, timeout: timeout)
            }
            stats.add(s)
            _ = stats.encodeMicros.record((Monotonic.nanos() - t0) / 1000)
        } catch {
            dropConnection(reason: "sending epoch \(epoch) failed: \(error)")
        }
    }

    private func report(_ notice: PrimaryMachine.Notice) {
        switch notice {
        case .protectionEstablished(let e):
            logger.notice("\(settings.vmName) is PROTECTED: secondary acknowledged full checkpoint \(e)")
            events.emit("protected", ["epoch": e.rawValue])
        case .unprotected(let reason):
            logger.warning("\(settings.vmName) is UNPROTECTED: \(reason)")
            events.emit("unprotected", ["reason": reason])
        case .peerLost(let reason):
            logger.warning("secondary lost (\(reason)); holding output for up to \(settings.machine.unprotectAfterNanos / 1_000_000) ms")
            events.emit("peer-lost", ["reason": reason])
        case .resyncing(let e, let reason):
            logger.warning("secondary refused epoch \(e) (\(reason)); sending a full checkpoint")
            events.emit("resync", ["epoch": e.rawValue, "reason": reason.description])
        case .epochDeferred:
            stats.deferredEpochs += 1
        case .staleAck(let e, let g):
            logger.warning("ignored an acknowledgement of epoch \(e) from generation \(g) (this pair is at \(settings.generation))")
        case .switchoverRefused(let reason):
            logger.warning("switchover refused: \(reason)")
            events.emit("switchover-refused", ["reason": reason])
            switchoverRequests.finish(SwitchoverResult(ok: false, message: "switchover refused: \(reason)"))
        case .switchoverAborted(let reason):
            logger.warning("switchover called off, \(settings.vmName) runs on here: \(reason)")
            events.emit("switchover-aborted", ["reason": reason])
            switchoverRequests.finish(SwitchoverResult(ok: false, message: "switchover called off, the VM runs on here: \(reason)"))
        }
    }

    private struct ProgressWindow {
        var epochs = 0
        var wireBytes = 0
        var nanos = Monotonic.nanos()
    }

    private func emitProgress(_ w: inout ProgressWindow) {
        let now = Monotonic.nanos()
        let seconds = Double(now - w.nanos) / 1e9
        let snap = port.snapshot
        let state: String
        switch machine.protection {
        case .protected: state = "protected"
        case .syncing: state = "syncing"
        case .peerLost: state = "peer-lost"
        case .unprotected: state = "unprotected"
        }
        var fields: [String: Any] = [
            "role": "primary",
            "vm": settings.vmName,
            "generation": settings.generation.rawValue,
            "peer": settings.peerHost.map { "\($0):\(settings.peerPort)" } ?? "none",
            "linkUp": connection != nil,
            "state": state,
            "epoch": machine.lastCaptured.rawValue,
            "acknowledged": machine.lastAcknowledged.rawValue,
            "acknowledgedCounter": lastAcknowledgedCounter,
            "counter": guest.progressCounter,
            "epochs": stats.epochs,
            "epochsPerSecond": seconds > 0 ? Double(stats.epochs - w.epochs) / seconds : 0,
            "wireBytes": stats.wireBytes,
            "wireBytesPerSecond": seconds > 0 ? Double(stats.wireBytes - w.wireBytes) / seconds : 0,
            "inputBytes": stats.inputBytes,
            "compressionRatio": stats.compressionRatio,
            "pauseMicros": PipelineStats.percentiles(stats.pauseMicros),
            "fullSyncPauseMicros": PipelineStats.percentiles(stats.fullSyncPauseMicros),
            "stopMicros": PipelineStats.percentiles(stats.stopMicros),
            "dirtyPagesMicros": PipelineStats.percentiles(stats.dirtyPagesMicros),
            "deviceStateMicros": PipelineStats.percentiles(stats.deviceStateMicros),
            "resumeMicros": PipelineStats.percentiles(stats.resumeMicros),
            "commitMicros": PipelineStats.percentiles(stats.commitMicros),
            "fullSyncCommitMicros": PipelineStats.percentiles(stats.fullSyncCommitMicros),
            "epochsInFlight": machine.epochsInFlight,
            "heldPackets": snap.heldCount,
            "heldBytes": snap.heldBytes,
            "outputFullRefusals": snap.fullRefusals,
            "outputLimitBytes": settings.outputLimitBytes,
            "outputStalls": outputStalls,
            "outputStallMillis": (outputStallNanos + (pausedForOutputSince.map { now - $0 } ?? 0)) / 1_000_000,
            "pausedForOutput": pausedForOutputSince != nil,
            "framesSent": snap.framesSent,
            "frameSendFailures": snap.frameSendFailures,
            "deferredEpochs": stats.deferredEpochs,
        ]
        for (k, v) in guest.statusReport { fields[k] = v }
        status.update(fields)
        events.emit("progress", fields)
        w = ProgressWindow(epochs: stats.epochs, wireBytes: stats.wireBytes, nanos: now)
    }
}

/// Progress of sending a full checkpoint: at most one report per interval, with the rate and
/// the time left at that rate. Pure arithmetic: the caller supplies the clock.
struct FullCopyProgress {
    let epoch: Epoch
    let totalPages: Int
    let startNanos: UInt64
    let intervalNanos: UInt64
    private var nextNanos: UInt64

    init(epoch: Epoch, totalPages: Int, startNanos: UInt64, intervalNanos: UInt64) {
        self.epoch = epoch
        self.totalPages = totalPages
        self.startNanos = startNanos
        self.intervalNanos = intervalNanos
        nextNanos = startNanos + intervalNanos
    }

    mutating func report(pagesDone: Int, nowNanos: UInt64) -> (text: String, fields: [String: Any])? {
        guard nowNanos >= nextNanos, totalPages > 0, nowNanos > startNanos else { return nil }
        nextNanos = nowNanos + intervalNanos
        let seconds = Double(nowNanos - startNanos) / 1e9
        let pagesPerSecond = Double(pagesDone) / seconds
        let etaSeconds = pagesPerSecond > 0 ? Double(totalPages - pagesDone) / pagesPerSecond : .infinity
        let mib = { (pages: Int) in (pages * GuestPage.size) >> 20 }
        let percent = 100 * pagesDone / totalPages
        let eta = etaSeconds.isFinite ? String(format: "%.1f s", etaSeconds) : "unknown"
        let text = "full checkpoint \(epoch): \(mib(pagesDone)) of \(mib(totalPages)) MiB (\(percent) %), "
            + String(format: "%.0f MiB/s", pagesPerSecond * Double(GuestPage.size) / 1_048_576) + ", about \(eta) left"
        return (text, ["epoch": epoch.rawValue, "pagesDone": pagesDone, "pagesTotal": totalPages, "percent": percent,
                       "etaSeconds": etaSeconds.isFinite ? etaSeconds : -1])
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
