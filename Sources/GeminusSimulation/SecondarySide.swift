import GeminusCore
import GeminusHypervisor
import GeminusReplication

/// The secondary's host: the real machine and replica, and the glue `SecondaryAgent` provides.
/// After a takeover it runs the resumed guest as the new (unprotected) primary.
final class SecondaryNode {
    var machine: SecondaryMachine
    let replica: Replica
    let incarnation: Int
    var connection: UInt64?
    var decoder = FrameDecoder()
    var lastSentNanos: UInt64 = 0
    var commitsThisIncarnation = 0
    /// A read that overdrew the step's budget (a large frame): paid off in the next steps.
    var readDebtBytes = 0
    /// The guest resumed from the replica at takeover, running as the new primary.
    var resumed: SimulatedGuest?
    var resumedFrom: Epoch = .none
    var acksDropped = 0

    init(config: SimulationConfig, pageCount: Int, generation: Generation, incarnation: Int) throws(GeminusError) {
        machine = SecondaryMachine(config: config.secondary, generation: generation)
        replica = Replica(memory: try PageMemory(pageCount: pageCount), generation: generation)
        self.incarnation = incarnation
    }
}

extension PairSimulator {
    func stepSecondary() {
        guard let s = secondary else {
            while toSecondary.receive(now: now) != nil {}
            return
        }
        var budget = readBudget.map { $0 - s.readDebtBytes } ?? Int.max
        var touchedReplica = false
        while secondary != nil, budget > 0, let packet = toSecondary.receive(now: now) {
            budget -= packet.byteCount
            if secondaryReceive(packet, s) { touchedReplica = true }
        }
        s.readDebtBytes = readBudget == nil ? 0 : max(0, -budget)
        guard secondary != nil else { return }
        if touchedReplica { checkReplica(s) }
        if let guest = s.resumed {
            runResumed(guest, s)
            return
        }
        secondaryPerform(s.machine.handle(.tick(nowNanos: now)), s)
        if let c = s.connection, s.resumed == nil, now - s.lastSentNanos >= config.heartbeatNanos {
            sendToPrimary(s, FrameCodec.encode(FrameHeader(kind: .heartbeat, generation: s.machine.generation, epoch: s.replica.committedEpoch)), connection: c)
        }
    }

    /// Handles one packet; true when it reached the replica.
    func secondaryReceive(_ packet: LinkPacket, _ s: SecondaryNode) -> Bool {
        switch packet {
        case .hello(let c, let g):
            let generation = Generation(g)
            // The admission rule of SecondaryAgent's acceptor: a node that runs the VM, or
            // knows a newer generation, refuses the dialling primary (it was deposed).
            if s.resumed != nil || generation < s.machine.generation {
                let reason = "generation \(generation) is stale: the pair is at generation \(s.machine.generation) (this primary was deposed)"
                toPrimary.send(.refused(connection: c, reason: reason), now: now, rng: &linkRandom)
                note("secondary", "refuses a dial of generation \(generation)", notable: staleDialsRefused == 0)
                return false
            }
            if s.connection != nil { loseLink(s, reason: "a new connection from the primary replaces this one", sendClose: true) }
            s.connection = c
            s.decoder = FrameDecoder()
            s.replica.adopt(generation: generation)
            toPrimary.send(.accepted(connection: c), now: now, rng: &linkRandom)
            s.lastSentNanos = now
            note("secondary", "accepts the primary (connection \(c), generation \(generation))", notable: true)
            secondaryPerform(s.machine.handle(.primaryConnected(generation, nowNanos: now)), s)
            return false
        case .close(let c), .reset(let c):
            guard s.connection == c else { return false }
            loseLink(s, reason: "the primary closed the connection", sendClose: false)
            return true
        case .frame(let c, let bytes):
            guard s.connection == c else {
                if s.resumed != nil {
                    // After the takeover the agent has closed the old primary's socket; here
                    // its late frames are handed to the replica anyway, so that the generation
                    // check alone is shown to refuse them.
                    var d = FrameDecoder()
                    d.feed(bytes)
                    if let frame = try? d.next() { refuseStale(frame, s) }
                    return true
                }
                // Bytes for a connection this host does not have (it restarted): TCP resets it.
                toPrimary.send(.reset(connection: c), now: now, rng: &linkRandom)
                return false
            }
            s.decoder.feed(bytes)
            var touched = false
            while secondary != nil, s.connection == c {
                let frame: Frame
                do {
                    guard let f = try s.decoder.next() else { break }
                    frame = f
                } catch {
                    // The stream is unusable after a bad frame; the epoch counts as corrupt and
                    // the primary resends everything on its next connection.
                    if case .checksumMismatch(_, let e, _) = error, case .rejected(let epoch, let reason, _) = s.replica.noteCorruptFrame(epoch: Epoch(e)) {
                        // Counted, not nacked: the connection ends here (as in SecondaryAgent).
                        note("secondary", "rejects epoch \(epoch) (\(reason))", notable: true)
                    }
                    note("secondary", "bad frame (\(error)); drops the connection", notable: true)
                    loseLink(s, reason: "\(error)", sendClose: true)
                    return true
                }
                if s.resumed != nil {
                    refuseStale(frame, s)
                    touched = true
                    continue
                }
                secondaryPerform(s.machine.handle(.heardFromPrimary(nowNanos: now)), s)
                switch frame.kind {
                case .epochBegin, .pages, .deviceState, .diskWrites, .epochEnd:
                    touched = true
                    noteOutcome(s.replica.accept(frame), s)
                case .heartbeat:
                    break
                default:
                    loseLink(s, reason: "primary sent an unexpected \(frame.kind) frame", sendClose: true)
                }
            }
            return touched
        case .accepted, .refused:
            return false
        }
    }

    /// A frame of the old primary after the takeover: the generation must refuse it.
    func refuseStale(_ frame: Frame, _ s: SecondaryNode) {
        guard [.epochBegin, .pages, .deviceState, .epochEnd].contains(frame.kind) else { return }
        let outcome = s.replica.accept(frame)
        if outcome == .ignored(.staleGeneration) {
            staleFramesRefused += 1
            if staleFramesRefused == 1 {
                note("secondary", "refuses a frame of the deposed generation \(frame.generation) (epoch \(frame.epoch)): the pair is at generation \(s.replica.generation)", notable: true)
            }
        } else {
            violate(.s1, "a frame of the deposed primary (generation \(frame.generation), epoch \(frame.epoch)) was not refused: \(outcome)", onceAs: "stale-accepted")
        }
    }

    func noteOutcome(_ outcome: Replica.Outcome, _ s: SecondaryNode) {
        switch outcome {
        case .staged, .ignored:
            break
        case .committed(let e, let stats):
            epochsCommitted += 1
            s.commitsThisIncarnation += 1
            checkCommit(e, stats, s)
            note("secondary", "commit \(e)\(stats.isFull ? " full" : "")", notable: stats.isFull)
            secondaryPerform(s.machine.handle(.committed(e, nowNanos: now)), s)
        case .rejected(let e, let reason, let detail):
            note("secondary", "rejects epoch \(e) (\(reason)): \(detail)", notable: true)
            secondaryPerform(s.machine.handle(.rejected(e, reason, nowNanos: now)), s)
        }
    }

    func loseLink(_ s: SecondaryNode, reason: String, sendClose: Bool) {
        guard let c = s.connection else { return }
        if sendClose { toPrimary.send(.close(connection: c), now: now, rng: &linkRandom) }
        s.connection = nil
        if let o = s.replica.abandonStaging(reason: .torn) { note("secondary", "abandons the epoch being received: \(o)", notable: true) }
        note("secondary", "link lost: \(reason)", notable: true)
        secondaryPerform(s.machine.handle(.primaryDisconnected(nowNanos: now, reason: reason)), s)
    }

    func secondaryPerform(_ actions: [SecondaryMachine.Action], _ s: SecondaryNode) {
        for action in actions {
            switch action {
            case .acknowledge(let e):
                if let c = s.connection {
                    sendToPrimary(s, FrameCodec.encode(FrameHeader(kind: .ack, generation: s.machine.generation, epoch: e)), connection: c)
                }
            case .refuse(let e, let reason):
                if let c = s.connection {
                    let nack = Nack(reason: reason, detail: "epoch \(e) refused")
                    sendToPrimary(s, FrameCodec.encode(FrameHeader(kind: .nack, generation: s.machine.generation, epoch: e), payload: nack.encoded()), connection: c)
                }
            case .dropLink(let reason):
                loseLink(s, reason: reason, sendClose: true)
            case .takeOver(let from, let generation):
                takeOver(s, from: from, generation: generation)
            case .acceptHandover, .declineHandover:
                violate(.s1, "the secondary answered a planned switchover (\(action)) no one requested", onceAs: "handover")
            case .notice(let n):
                switch n {
                case .primaryLost(let reason): note("secondary", "primary lost: \(reason)", notable: true)
                case .primaryBack: note("secondary", "primary back", notable: true)
                case .awaitingArbitration(let reason): note("secondary", "not taking over yet: \(reason)", notable: true)
                case .cannotTakeOver(let reason):
                    // Reported: the VM is down and says so (L1 allows that, never silence).
                    cannotTakeOverReported = true
                    note("secondary", "CANNOT TAKE OVER: \(reason)", notable: true)
                }
            }
        }
    }

    func sendToPrimary(_ s: SecondaryNode, _ bytes: [UInt8], connection c: UInt64) {
        if toPrimary.send(.frame(connection: c, bytes: bytes), now: now, rng: &linkRandom) {
            s.lastSentNanos = now
        } else {
            // Acks are cumulative and heartbeats repeat: one lost to a full link is made good by the next.
            s.acksDropped += 1
        }
    }

    /// Resumes the standby from the committed checkpoint, as SecondaryAgent does. The link to
    /// the old primary is left open on purpose (the agent closes it and stops listening): here
    /// the generation check alone must refuse whatever a deposed primary still sends.
    func takeOver(_ s: SecondaryNode, from: Epoch, generation: Generation) {
        guard s.replica.hasBaseImage else {
            violate(.l1, "the secondary took over at epoch \(from) without a whole checkpoint", onceAs: "takeover-empty")
            return
        }
        precondition(from == s.replica.committedEpoch, "the machine resumes the replica's committed epoch")
        // The running guest gets its own copy of memory, so the replica stays as committed and
        // the checks can still prove nothing after the takeover changes it.
        let memory = try! PageMemory(pageCount: s.replica.pageCount)
        memory.base.copyMemory(from: s.replica.memory.base, byteCount: memory.byteCount)
        let guest = try! SimulatedGuest(memory: memory, deviceState: s.replica.committedDeviceState)
        s.resumed = guest
        s.resumedFrom = from
        s.replica.adopt(generation: generation)
        takeoverAtNanos = now
        resumedOutputSequence = guest.outputSequence
        note("secondary", "TOOK OVER from epoch \(from) as generation \(generation) (counter \(guest.counter), output #\(guest.outputSequence))", notable: true)
        checkTakeover(s, guest, from: from)
    }

    /// The resumed guest runs unprotected: its output goes straight out (and is reported so).
    func runResumed(_ guest: SimulatedGuest, _ s: SecondaryNode) {
        for _ in 0..<config.guestStepsPerStep {
            if let bytes = guest.pendingOutput {
                _ = guest.flushOutput(to: TakeAll())
                if let packet = OutputPacket(decoding: bytes) { checkReleaseByResumed(packet) }
            }
            guest.step()
        }
    }
}
