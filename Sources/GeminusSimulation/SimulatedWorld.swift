import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication

extension PairSimulator {
    // MARK: - Building the hosts

    func makePrimary() throws(GeminusError) -> SimPrimaryHost {
        let host = SimPrimaryHost()
        let workload = guestWorkload
        let output = WorldOutput(world: self, resumed: false)
        output.host = host
        let port = HeldOutputPort(limitBytes: config.outputLimitBytes, destination: output, generation: Generation(1), openEpoch: Epoch(1))
        let guest = SteppedGuest(guest: try SimulatedGuest(workload: workload, memory: PageMemory(pageCount: workload.pageCount)),
                                 port: port, world: self)
        guest.host = host
        host.guest = guest
        try startPrimaryAgent(host, port: port)
        return host
    }

    /// The primary's agent on `host`: its node, dialer, witness link and lease, around the
    /// host's guest. A restarted agent gets new ones and starts over at epoch 1, at the next
    /// generation (as `GenerationFile.startGeneration(for: .primary)` has a real agent do).
    func startPrimaryAgent(_ host: SimPrimaryHost, port: HeldOutputPort, generation: Generation = Generation(1)) throws(GeminusError) {
        let guest = host.guest!
        host.dialer = WorldDialer(world: self, host: host)
        if witness != nil { host.witnessLink = WorldWitnessLink(world: self, node: .primary, host: host) }
        host.lease = config.arbitration.timings.map { WorldLease(world: self, host: host, lease: PrimaryLease(timings: $0, watchesRing: config.ringLease)) }
        host.node = try PrimaryNode(
            settings: .init(vmName: "vm", peer: "secondary", machine: config.primary, generation: generation,
                            outputLimitBytes: config.outputLimitBytes, progressIntervalNanos: .max / 2, soleCopyRedialNanos: config.redialNanos),
            guest: guest, port: port, clock: WorldClock(self), dialer: host.dialer, witness: host.witnessLink, lease: host.lease,
            events: WorldEvents(world: self, host: host, name: "primary"), maxFramePayload: config.maxFramePayload)
    }

    /// The primary's agent dies (SIGKILL) and starts again; its guest runs on meanwhile (a
    /// libvirt domain outlives its agent). What the old agent held is lost with it; its
    /// connection ends as the kernel closes its socket.
    public func restartPrimaryAgent() {
        guard let p = primary, p.node != nil else { return }
        note("world", "the primary's agent is killed and starts again (its guest runs on)", notable: true)
        p.link?.close()
        p.link = nil
        p.dialer.stop()
        let generation = p.node!.generation.next
        let output = WorldOutput(world: self, resumed: false)
        output.host = p
        let port = HeldOutputPort(limitBytes: config.outputLimitBytes, destination: output, generation: generation, openEpoch: Epoch(1))
        p.guest.port = port
        do {
            try startPrimaryAgent(p, port: port, generation: generation)
        } catch {
            violate(.s1, "the restarted primary agent could not start: \(error)", onceAs: "restart-primary")
        }
    }

    func makeSecondary(incarnation: Int) -> SimSecondaryHost {
        let host = SimSecondaryHost(incarnation: incarnation)
        host.acceptor = WorldAcceptor(world: self, host: host)
        if witness != nil { host.witnessLink = WorldWitnessLink(world: self, node: .secondary, host: host) }
        let standby = WorldStandby(world: self, diskBlocks: config.diskBlocks)
        standby.host = host
        let output = WorldOutput(world: self, resumed: true)
        output.host = host
        let limit = config.outputLimitBytes
        host.node = SecondaryNode(
            settings: .init(vmName: "vm", machine: config.secondary, generation: Generation(1), counterAddress: SimulatedGuest.counterAddress,
                            progressIntervalNanos: .max / 2),
            standby: standby, clock: WorldClock(self), acceptor: host.acceptor, witness: host.witnessLink,
            events: WorldEvents(world: self, host: host, name: "secondary"),
            makePort: { generation, epoch in HeldOutputPort(limitBytes: limit, destination: output, generation: generation, openEpoch: epoch) })
        return host
    }

    // MARK: - The primary's host

    func stepPrimary() {
        guard let p = primary else {
            // A dead host takes nothing off the wire: what reaches it is gone.
            while toPrimary.receive(now: now) != nil {}
            return
        }
        if let until = p.frozenUntilNanos {
            guard now >= until else { return }
            thaw(p)
            guard primary === p else { return }
        }
        if tickLease(p) { return }
        runGuest(p)
        while primary === p, !p.isFrozen, let packet = toPrimary.receive(now: now) { primaryReceive(packet, p) }
        guard primary === p, !p.isFrozen, let node = p.node else { return }
        node.step()
        guard primary === p, !p.isFrozen else { return }
        if node.outcome != nil {
            // Its guest stopped for good (a self-fence) or cannot be checkpointed: the host is
            // as good as gone.
            note("primary", "stops: \(node.outcome!)", notable: true)
            primary = nil
            // An ordinary stop ends the agent only: its node stays in the cluster, and the
            // secondary wins the VM through the stop notice, not through the node's absence.
            switch node.outcome! {
            case .stoppedForSecondary, .handedOver: break
            default: witness?.setRunning(.primary, false)
            }
            lostPrimary()
            return
        }
        p.dialer.step(generation: node.generation)
        if let l = p.link {
            flush(l)
            heartbeat(l, from: p, generation: node.generation, epoch: node.machine.lastCaptured)
        }
    }

    /// The guest runs for one step; its output goes through the node's output-commit port.
    func runGuest(_ p: SimPrimaryHost) {
        if !p.guest.run(steps: config.guestStepsPerStep) { p.guestStalls += 1 }
    }

    func primaryReceive(_ packet: LinkPacket, _ p: SimPrimaryHost) {
        switch packet {
        case .accepted, .refused:
            p.dialer.answered(packet)
        case .close(let c), .reset(let c):
            guard let l = p.link, l.id == c, !l.closed else { return }
            l.brokenReason = "the secondary \(packet == .close(connection: c) ? "closed" : "reset") the connection"
        case .frame(let c, let bytes):
            guard let l = p.link, l.id == c, !l.closed else { return }
            l.arrived(bytes)
        case .hello:
            break
        }
    }

    // MARK: - The secondary's host

    func stepSecondary() {
        guard let s = secondary else {
            while toSecondary.receive(now: now) != nil {}
            return
        }
        if s.applyHung {
            // What arrives waits on the wire; the link thread's heartbeats go on.
            if let l = s.link, !l.closed { heartbeat(l, from: s, generation: s.node.machine.generation, epoch: s.replica?.committedEpoch ?? .none) }
            return
        }
        var budget = readBudget.map { $0 - s.readDebtBytes } ?? Int.max
        var touchedReplica = false
        while secondary === s, budget > 0, let packet = toSecondary.receive(now: now) {
            budget -= packet.byteCount
            if secondaryReceive(packet, s) { touchedReplica = true }
        }
        s.readDebtBytes = readBudget == nil ? 0 : max(0, -budget)
        guard secondary === s else { return }
        if let guest = s.resumed {
            if touchedReplica { checkReplica(s) }
            runResumed(guest, s)
            return
        }
        s.node.step()
        if touchedReplica { checkReplica(s) }
        if let t = s.node.takeover {
            tookOver(s, t)
            return
        }
        if let l = s.link, !l.closed {
            flush(l)
            heartbeat(l, from: s, generation: s.node.machine.generation, epoch: s.replica?.committedEpoch ?? .none)
        }
    }

    /// Handles one packet; true when it may have reached the replica.
    func secondaryReceive(_ packet: LinkPacket, _ s: SimSecondaryHost) -> Bool {
        switch packet {
        case .hello(let c, let g):
            s.acceptor.hello(connection: c, generation: Generation(g), board: s.node.admission.state)
            return false
        case .close(let c), .reset(let c):
            guard let l = s.link, l.id == c, !l.closed else { return false }
            l.brokenReason = "the primary closed the connection"
            return true
        case .frame(let c, let bytes):
            guard let l = s.link, l.id == c, !l.closed else {
                if s.resumed != nil {
                    // After the takeover the node has closed the old primary's link; here its
                    // late frames are handed to the replica anyway, so that the generation
                    // check alone is shown to refuse them.
                    var d = FrameDecoder()
                    d.feed(bytes)
                    if let frame = try? d.next() { refuseStale(frame, s) }
                    return true
                }
                // Bytes for a connection this host does not have (it restarted): TCP resets it.
                if s.link?.id != c { sendPacket(from: s, .reset(connection: c)) }
                return false
            }
            l.arrived(bytes)
            return true
        case .accepted, .refused:
            return false
        }
    }

    /// A frame of the old primary after the takeover: the generation must refuse it.
    func refuseStale(_ frame: Frame, _ s: SimSecondaryHost) {
        guard [.epochBegin, .pages, .deviceState, .epochEnd].contains(frame.kind), let replica = s.replica else { return }
        let outcome = replica.accept(frame)
        if outcome == .ignored(.staleGeneration) {
            staleFramesRefused += 1
            if staleFramesRefused == 1 {
                note("secondary", "refuses a frame of the deposed generation \(frame.generation) (epoch \(frame.epoch)): the pair is at generation \(replica.generation)", notable: true)
            }
        } else {
            violate(.s1, "a frame of the deposed primary (generation \(frame.generation), epoch \(frame.epoch)) was not refused: \(outcome)", onceAs: "stale-accepted")
        }
    }

    /// The node resumed the standby: the world checks the resumed guest and runs it as the new,
    /// unprotected primary (a `PrimaryNode` without a secondary, as the agent runs it).
    func tookOver(_ s: SimSecondaryHost, _ t: SecondaryNode.Takeover) {
        guard let guest = t.guest as? SteppedGuest else { preconditionFailure("the world's standby resumes stepped guests") }
        precondition(t.fromEpoch == s.replica?.committedEpoch, "the node resumes the replica's committed epoch")
        s.resumed = guest
        s.resumedFrom = t.fromEpoch
        takeoverAtNanos = now
        resumedOutputSequence = guest.guest.outputSequence
        checkTakeover(s, guest.guest, from: t.fromEpoch)
        s.resumedNode = try? PrimaryNode(
            settings: .init(vmName: "vm", peer: nil, machine: config.primary, generation: t.generation, resumedFrom: t.fromEpoch,
                            outputLimitBytes: config.outputLimitBytes, progressIntervalNanos: .max / 2),
            guest: guest, port: t.port, clock: WorldClock(self), dialer: nil,
            witness: config.arbitration == .none ? nil : s.witnessLink, lease: nil, events: WorldEvents(world: self, host: s, name: "secondary"))
    }

    /// The resumed guest runs unprotected: its output goes straight out (and is reported so).
    func runResumed(_ guest: SteppedGuest, _ s: SimSecondaryHost) {
        _ = guest.run(steps: config.guestStepsPerStep)
        s.resumedNode?.step()
    }

    // MARK: - Wire and effects

    /// A host's effect on the world: none from a dead host, later from a frozen one.
    func hostSays(_ host: SimHost, _ effect: @escaping (PairSimulator) -> Void) {
        guard host.isAlive else { return }
        if host.isFrozen { host.deferred.append(effect); return }
        effect(self)
    }

    func sendPacket(from host: SimHost, _ packet: LinkPacket) {
        hostSays(host) { w in
            if host is SimPrimaryHost { _ = w.toSecondary.send(packet, now: w.now, rng: &w.linkRandom) } else { _ = w.toPrimary.send(packet, now: w.now, rng: &w.linkRandom) }
        }
    }

    /// Moves a link's queued frames onto the wire while there is room (a frozen or dead host's
    /// stay where they are).
    func flush(_ l: WorldLink) {
        guard l.host.isAlive, !l.host.isFrozen else { return }
        let toPeer = l.host is SimPrimaryHost
        while l.sendHead < l.sendQueue.count {
            let (bytes, last) = l.sendQueue[l.sendHead]
            let sent = toPeer ? toSecondary.send(.frame(connection: l.id, bytes: bytes), now: now, rng: &linkRandom)
                : toPrimary.send(.frame(connection: l.id, bytes: bytes), now: now, rng: &linkRandom)
            guard sent else {
                if !toPeer {
                    // Acks are cumulative and heartbeats repeat: one lost to a full link is made good by the next.
                    l.sendHead += 1
                    l.sendQueueBytes -= bytes.count
                    continue
                }
                break
            }
            l.sendHead += 1
            l.sendQueueBytes -= bytes.count
            l.lastSentNanos = now
            if let e = last, let p = l.host as? SimPrimaryHost, p.armedCrash == .afterSend {
                crashPrimary(p, "after sending epoch \(e), before its ack")
                return
            }
        }
        if l.sendHead == l.sendQueue.count { l.sendQueue.removeAll(keepingCapacity: true); l.sendHead = 0 }
    }

    func heartbeat(_ l: WorldLink, from host: SimHost, generation: Generation, epoch: Epoch) {
        guard !l.closed, l.sendHead == l.sendQueue.count, now - l.lastSentNanos >= config.heartbeatNanos else { return }
        l.sendQueue.append((FrameCodec.encode(FrameHeader(kind: .heartbeat, generation: generation, epoch: epoch)), nil))
        flush(l)
    }

    /// Output leaves a host: the observer sees it, and the checks judge it. Console lines and
    /// NIC frames alike: each carries one guest packet, and must leave as the kind the guest
    /// sent it as.
    func released(_ items: [GuestOutputItem], by host: SimHost, held: Bool, resumed: Bool) {
        let who = resumed ? "the resumed guest" : "the primary"
        for item in items {
            let decoded: OutputPacket?
            let asFrame: Bool
            switch item {
            case .line(let bytes):
                decoded = OutputPacket(decoding: bytes)
                asFrame = false
            case .frame(let bytes):
                decoded = SimulatedNICFrame.unwrap(bytes, seed: config.seed).flatMap { OutputPacket(decoding: $0) }
                asFrame = true
            }
            guard let packet = decoded,
                  packet.check == OutputPacket.checkValue(sequence: packet.sequence, counter: packet.counter, seed: config.seed) else {
                violate(.s2, "\(who) released \(asFrame ? "a NIC frame" : "a console line") that is not a guest packet", onceAs: "garbage-output")
                continue
            }
            if asFrame { framesReleased += 1 } else { linesReleased += 1 }
            if SimulatedGuest.sendsAsFrame(sequence: packet.sequence, guestWorkload) != asFrame {
                violate(.s2, "\(who) released output #\(packet.sequence) as a \(asFrame ? "NIC frame" : "console line"); the guest sent it as a \(asFrame ? "console line" : "NIC frame")", onceAs: "output-kind")
            }
            if resumed {
                checkReleaseByResumed(packet)
            } else if let p = host as? SimPrimaryHost, let node = p.node {
                checkRelease(packet, byPrimary: node, held: held)
            }
        }
    }

    /// An ordinary stop of the primary's agent (SIGTERM): the node ends its role as the agent's
    /// loop does on a stop request. Its host stays in the cluster (Corosync runs on).
    public func stopPrimary() {
        guard let p = primary, let node = p.node else { return }
        note("world", "stop primary (its agent is asked to stop)", notable: true)
        let outcome = node.finish(stopRequested: true)
        note("primary", "stops: \(outcome)", notable: true)
        p.isAlive = false
        primary = nil
        lostPrimary()
    }

    /// The operator asks the primary for a planned switchover (`geminus failover`).
    public func requestSwitchover() {
        guard let node = primary?.node else { return }
        note("world", "the operator asks for a planned switchover", notable: true)
        node.requestSwitchover()
    }

    /// A `handover` frame for the checkpoint the secondary holds reaches it on the primary's
    /// connection without the primary having asked: what a relay on the link would forge (the
    /// real link seals its frames, so there it ends the connection; here it gets through, to
    /// show that the frame alone moves nothing under a witness).
    public func forgeHandover() {
        guard let s = secondary, let l = s.link, !l.closed else { return }
        note("world", "a forged handover frame for checkpoint \(s.node.machine.committed) reaches the secondary", notable: true)
        l.arrived(FrameCodec.encode(FrameHeader(kind: .handover, generation: s.node.machine.generation, epoch: s.node.machine.committed)))
    }

    /// The secondary's apply loop hangs (`on`) or comes back.
    public func hangSecondaryApply(_ on: Bool) {
        guard let s = secondary, s.applyHung != on else { return }
        s.applyHung = on
        note("world", on ? "the secondary's apply loop hangs (its link still heartbeats)" : "the secondary's apply loop runs again", notable: true)
    }

    /// The primary's next capture fails (`capture`), or its next resume (`resume`).
    public func failPrimaryNext(capture: Bool, resume: Bool) {
        guard let p = primary else { return }
        if capture { p.guest.failNextCapture = true }
        if resume { p.guest.failNextResume = true }
        note("world", "the primary's next \([capture ? "capture" : nil, resume ? "resume" : nil].compactMap { $0 }.joined(separator: " and ")) will fail", notable: true)
    }

    /// The secondary's standby health watch finds its standby DOWN (`down`) or answering again.
    public func setStandbyDown(_ down: Bool) {
        guard let s = secondary else { return }
        note("world", down ? "the secondary's standby stops answering" : "the secondary's standby answers again", notable: true)
        s.node.standbyHealth.down = down ? "DOWN (the standby QEMU does not answer)" : nil
    }

    func crashPrimary(_ p: SimPrimaryHost, _ why: String) {
        guard p.isAlive else { return }
        count("primary-crash:\(p.armedCrash?.rawValue ?? "now")")
        note("primary", "CRASHED \(why)", notable: true)
        p.isAlive = false
        if primary === p { primary = nil }
        witness?.setRunning(.primary, false)
        lostPrimary()
    }

    /// The host hangs with `epoch` in its socket buffer; what it does until it thaws reaches
    /// the world only then.
    func freeze(_ p: SimPrimaryHost, forNanos d: UInt64, holding epoch: Epoch) {
        p.frozenUntilNanos = now + d
        witness?.setRunning(.primary, false)
        count("stale-primary")
        lostPrimary()
        lastIsolationNanos = now
        note("primary", "FROZEN for \(d / 1_000_000) ms with epoch \(epoch) in its socket buffer", notable: true)
    }

    func thaw(_ p: SimPrimaryHost) {
        p.frozenUntilNanos = nil
        witness?.setRunning(.primary, true)
        note("primary", "thawed: carries on as generation \(p.generation)", notable: true)
        // The kernel drains the socket buffer before the agent looks at anything: the epoch
        // queued when the host hung goes out, still as the old generation.
        if let l = p.link { flush(l) }
        // The worst order for the promises: what the epoch loop did as it hung reaches the
        // world before the fence watch (its own thread in the agent) gets to look at the clock.
        let effects = p.deferred
        p.deferred = []
        for effect in effects where p.isAlive { effect(self) }
    }
}
