import GeminusCore
import GeminusHypervisor
import GeminusReplication

/// The primary's host: its guest, the real machine, encoder and output queue, and the
/// connection glue `PrimaryAgent` provides in real life.
final class PrimaryNode {
    enum Connection: Equatable {
        case idle(redialAtNanos: UInt64)
        case dialing(UInt64, sinceNanos: UInt64)
        case connected(UInt64)
    }

    var machine: PrimaryMachine
    /// The fence watch (with a witness): ticks every step the host runs.
    var lease: PrimaryLease?
    let guest: SimulatedGuest
    let encoder: CheckpointEncoder
    let buffer: CheckpointBuffer
    var queue: OutputQueue<[UInt8]>
    var connection: Connection = .idle(redialAtNanos: 0)
    var decoder = FrameDecoder()
    /// Frames waiting for room on the link. Bounded by the machine: at most
    /// `maxEpochsInFlight` epochs are unacknowledged, so at most that many are queued here.
    var sendQueue: [(packet: LinkPacket, lastOfEpoch: Epoch?)] = []
    var sendHead = 0
    var sendQueueBytes = 0
    var peakSendQueueBytes = 0
    var lastSentNanos: UInt64 = 0
    var frozenUntilNanos: UInt64?
    /// A freeze waits for the next send, so the host hangs with an epoch in its socket buffer.
    var armedFreezeNanos: UInt64?
    /// Actions the machine asked for when the host hung: carried out when it thaws.
    var actionsAfterThaw: [PrimaryMachine.Action] = []
    var armedCrash: CrashPoint?
    /// With `.afterSend` armed: crash once this epoch's last frame has left.
    var crashWhenSent: Epoch?
    var guestStalls = 0
    var lastReleasedCounter: UInt64 = 0
    let maxEpochWireBytes: Int

    init(config: SimulationConfig, workload: SimulatedWorkload) throws(GeminusError) {
        machine = PrimaryMachine(config: config.primary, generation: Generation(1))
        lease = config.arbitration.timings.map { PrimaryLease(timings: $0, watchesRing: config.ringLease) }
        guest = try SimulatedGuest(workload: workload, memory: PageMemory(pageCount: workload.pageCount))
        encoder = try CheckpointEncoder(pageCount: workload.pageCount, maxFramePayload: config.maxFramePayload)
        buffer = CheckpointBuffer(limitPages: workload.pageCount)
        queue = OutputQueue(limitBytes: config.outputLimitBytes, mode: .passThrough)
        // A full epoch: every page raw with its record, the device state, and framing.
        let frames = workload.pageCount * GuestPage.size / config.maxFramePayload + 64
        maxEpochWireBytes = workload.pageCount * (GuestPage.size + PageRecordHeader.size) + (64 << 10) + frames * FrameHeader.size
    }

    var connectionID: UInt64? {
        if case .connected(let c) = connection { return c }
        return nil
    }

    func enqueue(_ packet: LinkPacket, lastOfEpoch: Epoch? = nil) {
        sendQueue.append((packet, lastOfEpoch))
        sendQueueBytes += packet.byteCount
        peakSendQueueBytes = max(peakSendQueueBytes, sendQueueBytes)
    }

    func clearSendQueue() {
        sendQueue.removeAll(keepingCapacity: true)
        sendHead = 0
        sendQueueBytes = 0
        crashWhenSent = nil
    }
}

extension PairSimulator {
    func stepPrimary() {
        guard let p = primary else {
            // A dead host takes nothing off the wire: what reaches it is gone.
            while toPrimary.receive(now: now) != nil {}
            return
        }
        if let until = p.frozenUntilNanos {
            guard now >= until else { return }
            p.frozenUntilNanos = nil
            witness?.setRunning(.primary, true)
            note("primary", "thawed: carries on as generation \(p.machine.generation)", notable: true)
            // The kernel drains the socket buffer before the agent looks at anything: the
            // epoch queued when the host hung goes out, still as the old generation.
            flushSendQueue(p)
            guard primary != nil else { return }
            let rest = p.actionsAfterThaw
            p.actionsAfterThaw = []
            // The worst order for the promises: the epoch loop finishes what it was doing before
            // the fence watch (its own thread in the agent) gets to look at the clock.
            primaryPerform(rest, p)
            guard primary != nil else { return }
        }
        if tickLease(p) { return }
        runGuest(p)
        // A host that hung (or died) in the middle of this step does nothing more in it.
        var running: Bool { primary != nil && p.frozenUntilNanos == nil }
        while running, let packet = toPrimary.receive(now: now) { primaryReceive(packet, p) }
        guard running else { return }
        primaryPerform(p.machine.handle(.tick(nowNanos: now)), p)
        guard running else { return }
        dial(p)
        flushSendQueue(p)
        guard running else { return }
        if let c = p.connectionID, p.sendHead == p.sendQueue.count, now - p.lastSentNanos >= config.heartbeatNanos {
            sendFrame(p, FrameCodec.encode(FrameHeader(kind: .heartbeat, generation: p.machine.generation, epoch: p.machine.lastCaptured)), connection: c)
        }
    }

    /// The guest runs for one step; its output goes through the real output-commit queue.
    func runGuest(_ p: PrimaryNode) {
        for _ in 0..<config.guestStepsPerStep {
            if let packet = p.guest.pendingOutput {
                switch p.queue.append(packet, bytes: packet.count) {
                case .full:
                    // The guest stalls (its TX ring is full) until an ack frees room.
                    p.guestStalls += 1
                    return
                case .held:
                    _ = p.guest.flushOutput(to: TakeAll())
                case .releaseNow:
                    _ = p.guest.flushOutput(to: TakeAll())
                    releaseFromPrimary([packet], p, held: false)
                }
            }
            p.guest.step()
        }
    }

    func dial(_ p: PrimaryNode) {
        switch p.connection {
        case .idle(let at) where now >= at:
            let c = newConnection()
            p.connection = .dialing(c, sinceNanos: now)
            toSecondary.send(.hello(connection: c, generation: p.machine.generation.rawValue), now: now, rng: &linkRandom)
            note("primary", "dials (connection \(c), generation \(p.machine.generation))")
        case .dialing(_, let since) where now - since >= config.dialTimeoutNanos:
            note("primary", "dial unanswered for \(config.dialTimeoutNanos / 1_000_000) ms")
            p.connection = .idle(redialAtNanos: now)
        default:
            break
        }
    }

    func primaryReceive(_ packet: LinkPacket, _ p: PrimaryNode) {
        switch packet {
        case .accepted(let c):
            guard case .dialing(c, _) = p.connection else { return }
            // A sole copy arms its lease before the secondary gets anything, and turns the
            // secondary away while the lease would fence (`PrimaryAgent.soleCopyRefusal`).
            if p.machine.soleCopy, var l = p.lease {
                if let why = l.unhealthy(now) {
                    note("primary", "not protecting yet, it holds the only copy: \(why)", notable: true)
                    p.connection = .idle(redialAtNanos: now + config.redialNanos)
                    return
                }
                let actions = l.handle(.soleCopy(false, nowNanos: now))
                p.lease = l
                if leaseActions(actions, p) { return }
            }
            p.connection = .connected(c)
            p.decoder = FrameDecoder()
            p.clearSendQueue()
            note("primary", "connected (connection \(c))", notable: true)
            primaryPerform(p.machine.handle(.peerConnected(nowNanos: now)), p)
        case .refused(let c, let reason):
            guard case .dialing(c, _) = p.connection else { return }
            staleDialsRefused += 1
            note("primary", "refused by the secondary: \(reason)", notable: staleDialsRefused <= 1)
            p.connection = .idle(redialAtNanos: now + 5 * config.redialNanos)
        case .close(let c), .reset(let c):
            guard p.connectionID == c else { return }
            closePrimaryConnection(p, reason: "the secondary \(packet == .close(connection: c) ? "closed" : "reset") the connection", sendClose: false)
        case .frame(let c, let bytes):
            guard p.connectionID == c else { return }
            p.decoder.feed(bytes)
            while primary != nil, p.frozenUntilNanos == nil, p.connectionID == c {
                let frame: Frame
                do {
                    guard let f = try p.decoder.next() else { break }
                    frame = f
                } catch {
                    note("primary", "bad frame from the secondary (\(error)); drops the connection", notable: true)
                    closePrimaryConnection(p, reason: "\(error)", sendClose: true)
                    return
                }
                primaryPerform(p.machine.handle(.heardFromPeer(nowNanos: now)), p)
                switch frame.kind {
                case .ack:
                    note("primary", "ack \(frame.epoch) (generation \(frame.generation))")
                    primaryPerform(p.machine.handle(.acknowledged(frame.epoch, frame.generation, nowNanos: now)), p)
                case .nack:
                    let nack = Nack(decoding: frame.payload)
                    note("primary", "nack \(frame.epoch) (\(nack?.reason.description ?? "unreadable"))")
                    primaryPerform(p.machine.handle(.refused(frame.epoch, nack?.reason ?? .badRecord, nowNanos: now)), p)
                case .heartbeat:
                    break
                default:
                    closePrimaryConnection(p, reason: "secondary sent an unexpected \(frame.kind) frame", sendClose: true)
                }
            }
        case .hello:
            break
        }
    }

    func closePrimaryConnection(_ p: PrimaryNode, reason: String, sendClose: Bool) {
        if sendClose, let c = p.connectionID { toSecondary.send(.close(connection: c), now: now, rng: &linkRandom) }
        p.connection = .idle(redialAtNanos: now + config.redialNanos)
        p.clearSendQueue()
        primaryPerform(p.machine.handle(.peerDisconnected(nowNanos: now, reason: reason)), p)
    }

    /// Carries out the machine's actions the way `PrimaryAgent` does, stopping dead at an armed
    /// crash point: nothing after it happens.
    func primaryPerform(_ actions: [PrimaryMachine.Action], _ p: PrimaryNode) {
        var pending = actions[...]
        while let action = pending.popFirst() {
            guard primary != nil else { return }
            guard p.frozenUntilNanos == nil else { p.actionsAfterThaw.append(action); continue }
            switch action {
            case .capture(let e, let full):
                if p.armedCrash == .beforeCapture { crashPrimary("before capturing epoch \(e)"); return }
                try! p.guest.capture(full: full, into: p.buffer)
                if p.armedCrash == .duringCapture { crashPrimary("while capturing epoch \(e) (guest paused)"); return }
                captured[e] = CapturedState(memoryDigest: digest(p.guest.memory), deviceStateDigest: digest(p.buffer.deviceState),
                                            counter: p.guest.counter, outputSequence: p.guest.outputSequence)
                if full { fullCheckpoints += 1 }
                if p.queue.mode == .passThrough { _ = p.queue.setMode(.holding) }
                p.queue.open(epoch: e.next)
                note("primary", "capture \(e)\(full ? " full" : "") (counter \(p.guest.counter), \(p.buffer.pageCount) pages)", notable: full)
                if p.armedCrash == .afterCapture { crashPrimary("after capturing epoch \(e), before sending it"); return }
                pending += p.machine.handle(.captured(e, nowNanos: now))
            case .transmit(let e, let base):
                guard let c = p.connectionID else { continue }
                var frames: [[UInt8]] = []
                _ = p.encoder.encode(p.buffer, epoch: e, generation: p.machine.generation, baseEpoch: base) { frames.append($0) }
                if p.armedCrash == .duringSend {
                    // At least the begin frame and at most all but the end: a torn epoch.
                    let keep = 1 + Int(worldRandom.next() % UInt64(max(1, frames.count - 1)))
                    for f in frames.prefix(keep) { p.enqueue(.frame(connection: c, bytes: f)) }
                    flushSendQueue(p)
                    crashPrimary("while sending epoch \(e) (\(keep) of \(frames.count) frames queued)")
                    return
                }
                for (i, f) in frames.enumerated() { p.enqueue(.frame(connection: c, bytes: f), lastOfEpoch: i == frames.count - 1 ? e : nil) }
                if p.armedCrash == .afterSend { p.crashWhenSent = e }
                note("primary", "send \(e) on \(base) (\(frames.count) frames)")
                if let d = p.armedFreezeNanos {
                    p.armedFreezeNanos = nil
                    p.frozenUntilNanos = now + d
                    witness?.setRunning(.primary, false)
                    p.actionsAfterThaw = Array(pending)
                    count("stale-primary")
                    lostPrimary()
                    lastIsolationNanos = now
                    note("primary", "FROZEN for \(d / 1_000_000) ms with epoch \(e) in its socket buffer", notable: true)
                    return
                }
            case .releaseOutput(let e):
                if p.armedCrash == .afterAck { crashPrimary("after the ack of epoch \(e), before releasing its output"); return }
                releaseFromPrimary(p.queue.release(through: e), p, held: true)
            case .releaseAllOutput:
                releaseFromPrimary(p.queue.setMode(.passThrough), p, held: false)
            case .disconnect(let reason):
                if let c = p.connectionID { toSecondary.send(.close(connection: c), now: now, rng: &linkRandom) }
                p.connection = .idle(redialAtNanos: now + config.redialNanos)
                p.clearSendQueue()
                note("primary", "drops the link: \(reason)", notable: true)
            case .announceUnprotected(let generation, let after):
                note("primary", "asks the witness to record generation \(generation) unprotected after epoch \(after)", notable: true)
                witness?.announce(from: .primary, WitnessRecord(generation: generation, unprotectedAfter: after), now: now)
            case .notice(let n):
                primaryNotice(n)
            case .captureFinal, .handOver, .resumeGuest, .finishHandover:
                violate(.s1, "the primary asked for a planned switchover step (\(action)) that no one requested", onceAs: "switchover")
            }
        }
    }

    func primaryNotice(_ n: PrimaryMachine.Notice) {
        switch n {
        case .protectionEstablished(let e): note("primary", "protected from epoch \(e)", notable: true)
        case .unprotected(let reason): note("primary", "UNPROTECTED: \(reason); releases held output", notable: true)
        case .peerLost(let reason): note("primary", "secondary lost: \(reason)", notable: true)
        case .resyncing(let e, let r): resyncs += 1; note("primary", "resync after nack of epoch \(e) (\(r))", notable: true)
        case .epochDeferred(let n):
            deferredEpochs += 1
            // The first one tells the story; the rest are counted.
            note("primary", "epoch deferred: \(n) epochs in flight (backpressure)", notable: deferredEpochs == 1)
        case .staleAck(let e, let g): note("primary", "stale ack \(e) of generation \(g) ignored", notable: true)
        case .switchoverRefused(let r), .switchoverAborted(let r): note("primary", "switchover: \(r)")
        }
    }

    func flushSendQueue(_ p: PrimaryNode) {
        while p.sendHead < p.sendQueue.count {
            let (packet, last) = p.sendQueue[p.sendHead]
            guard toSecondary.send(packet, now: now, rng: &linkRandom) else { break }
            p.sendHead += 1
            p.sendQueueBytes -= packet.byteCount
            p.lastSentNanos = now
            if let e = last, p.crashWhenSent == e {
                crashPrimary("after sending epoch \(e), before its ack")
                return
            }
        }
        if p.sendHead == p.sendQueue.count { p.sendQueue.removeAll(keepingCapacity: true); p.sendHead = 0 }
    }

    func sendFrame(_ p: PrimaryNode, _ bytes: [UInt8], connection c: UInt64) {
        if toSecondary.send(.frame(connection: c, bytes: bytes), now: now, rng: &linkRandom) { p.lastSentNanos = now }
    }

    /// Output leaves the primary: the observer sees it, and the checks judge it.
    func releaseFromPrimary(_ items: [[UInt8]], _ p: PrimaryNode, held: Bool) {
        for bytes in items {
            guard let packet = OutputPacket(decoding: bytes) else {
                violate(.s2, "the primary released \(bytes.count) bytes that are not a guest packet", onceAs: "garbage-output")
                continue
            }
            checkRelease(packet, byPrimary: p, held: held)
            p.lastReleasedCounter = max(p.lastReleasedCounter, packet.counter)
        }
    }
}

/// A NIC that always has room: the output queue, not the port, is what holds packets back.
struct TakeAll: GuestOutputPort {
    func offer(_ packet: [UInt8]) -> Bool { true }
}
