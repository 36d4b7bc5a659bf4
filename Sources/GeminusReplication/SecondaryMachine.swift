import GeminusCore

/// The secondary's follow/acknowledge/take-over logic as a state machine (no I/O, no clock).
/// The replica itself (decode, verify, apply) is `GeminusCore.Replica`; this machine decides
/// what each outcome means for the pair.
public struct SecondaryMachine: Sendable {
    public struct Config: Sendable, Equatable {
        /// No frame or heartbeat from the primary for this long: the primary is lost and the
        /// standby resumes (promise L1 bounds failover by this plus the resume time).
        public var takeoverAfterNanos: UInt64
        /// With a witness, the takeover also needs this node to have won: quorate, with the
        /// primary's node gone from its view, for `takeoverWaitNanos` (the primary's stale quorum
        /// and its self-fence, see `ArbitrationTimings`), and the witness's record must not
        /// say the checkpoint held here is behind released output.
        public var arbitration: Arbitration
        /// With a witness, how long a planned handover waits for the witness view to show the
        /// primary's stop notice before it is declined. The notice normally follows the frame
        /// within a few cluster deliveries; it is kept well below the primary's wait for the
        /// answer (`PrimaryMachine.Config.takeoverConfirmTimeoutNanos`, 20 s by default), so that
        /// the primary hears the decline rather than giving up on its own.
        public var handoverRecordWaitNanos: UInt64

        public init(takeoverAfterNanos: UInt64 = 150_000_000, arbitration: Arbitration = .none,
                    handoverRecordWaitNanos: UInt64 = 5_000_000_000) {
            self.takeoverAfterNanos = takeoverAfterNanos
            self.arbitration = arbitration
            self.handoverRecordWaitNanos = handoverRecordWaitNanos
        }
    }

    public enum State: Equatable, Sendable {
        /// No primary has delivered a whole checkpoint yet: nothing to resume.
        case waitingForFirstCheckpoint
        /// Connected and current.
        case following
        /// The link is down; takeover at `sinceNanos + takeoverAfterNanos` unless it comes back.
        case primarySilent(sinceNanos: UInt64)
        /// The standby was resumed; this node is the primary now, at `generation`.
        case tookOver(from: Epoch, generation: Generation)
    }

    public enum Event: Equatable, Sendable {
        case tick(nowNanos: UInt64)
        case primaryConnected(Generation, nowNanos: UInt64)
        case primaryDisconnected(nowNanos: UInt64, reason: String)
        case heardFromPrimary(nowNanos: UInt64)
        case committed(Epoch, nowNanos: UInt64)
        case rejected(Epoch, RejectReason, detail: String = "", nowNanos: UInt64)
        /// The primary said that it stopped its guest for good after `Epoch` was acknowledged
        /// (an ordinary stop: a capture error, SIGTERM): no silence to wait out.
        case primaryStopped(Epoch, reason: String, nowNanos: UInt64)
        /// The standby's health watch: `down` says why it is down, nil that it answers again.
        case standbyHealth(down: String?, nowNanos: UInt64)
        /// Planned switchover: the primary has paused its guest for good at `Epoch`. With a
        /// witness it is accepted only once the witness view holds the primary's stop notice.
        case handoverRequested(Epoch, nowNanos: UInt64)
        /// What the witness says now (with `Arbitration.witness`).
        case witness(WitnessView, nowNanos: UInt64)
    }

    public enum Action: Equatable, Sendable {
        case acknowledge(Epoch)
        case refuse(Epoch, RejectReason)
        case dropLink(reason: String)
        /// Resume the standby from the committed checkpoint `from`, as primary of `generation`.
        case takeOver(from: Epoch, generation: Generation)
        /// Planned switchover: resume the standby from `from` as `generation`, then tell the
        /// primary (it waits, paused, for that answer).
        case acceptHandover(from: Epoch, generation: Generation)
        /// Planned switchover refused: the primary runs its guest on (with a witness, whose stop
        /// notice is final, it stops it for good, and this node takes over by that notice).
        case declineHandover(Epoch, reason: String)
        case notice(Notice)
    }

    public enum Notice: Equatable, Sendable {
        case primaryLost(reason: String)
        case primaryBack
        /// The primary said it stopped its guest for good after `Epoch`.
        case primaryStopped(Epoch, reason: String)
        case cannotTakeOver(reason: String)
        /// The standby is down: nothing here could resume the VM, so the primary is let go (it
        /// runs unprotected by its usual rules) until the standby answers again.
        case standbyDown(reason: String)
        case standbyBack
        /// The primary is silent but the witness has not given this node the VM (yet).
        case awaitingArbitration(reason: String)
    }

    public let config: Config
    public private(set) var state: State = .waitingForFirstCheckpoint
    public private(set) var generation: Generation
    public private(set) var committed: Epoch = .none
    /// The generation whose primary sent `committed`. A primary of a newer generation may
    /// connect before its first checkpoint commits here (a restarted primary agent takes the
    /// next generation); the witness's record must be read against the checkpoint held, or a
    /// record of the older generation would seem not to concern it.
    public private(set) var committedGeneration: Generation
    private var connected = false
    private var lastHeardNanos: UInt64 = 0
    private var everConnected = false
    private var reportedCannotTakeOver = false
    /// Whether `committed` is still a state the primary stands behind. A reconnecting primary
    /// may have declared the VM unprotected meanwhile and released output beyond it (it cannot
    /// say so in the handshake yet), so from a reconnection until the new connection's first
    /// commit, resuming `committed` could un-send released output (found by the simulator,
    /// seed 1337; scenario stale-checkpoint-after-unprotected-is-not-resumed). With a witness
    /// the primary releases unprotected only once the witness recorded it, and the takeover
    /// checks that record, so a reconnection alone does not make `committed` suspect: a fenced
    /// primary whose last dial completed after the cut healed must not leave the VM down.
    private var committedIsCurrent = false
    public private(set) var witness: WitnessView?
    /// Since when this node has won (quorate, the primary's node gone), with a witness.
    private var wonSinceNanos: UInt64?
    private var reportedAwaiting: String?
    /// Why the replica holds no whole VM although `committed` is set (its disk failed at a
    /// commit), until the next whole checkpoint commits.
    public private(set) var replicaBroken: String?
    /// Why the standby is down (from its health watch), while it is.
    public private(set) var standbyDown: String?
    /// The primary said it stopped its guest for good: the takeover need not wait out a silence.
    private var primaryStoppedItsGuest = false
    /// This node dropped the primary because its standby is down: the silence that follows is
    /// its own doing, not news of the primary.
    private var letPrimaryGo = false
    /// With a witness: a handover frame that waits for the primary's stop notice in the witness
    /// view (no single frame moves the VM).
    private var pendingHandover: (epoch: Epoch, sinceNanos: UInt64)?

    public init(config: Config, generation: Generation) {
        self.config = config
        self.generation = generation
        committedGeneration = generation
    }

    public mutating func handle(_ event: Event) -> [Action] {
        if case .tookOver = state { return [] }
        switch event {
        case .primaryConnected(let gen, let now):
            precondition(gen >= generation, "the handshake admits no older generation")
            if everConnected && config.arbitration == .none { committedIsCurrent = false }
            // A new episode: if this primary is lost too, that is said again (seed 114).
            reportedCannotTakeOver = false
            primaryStoppedItsGuest = false
            letPrimaryGo = false
            pendingHandover = nil
            generation = gen
            connected = true
            everConnected = true
            lastHeardNanos = now
            reportedAwaiting = nil
            if case .primarySilent = state {
                state = .following
                return [.notice(.primaryBack)]
            }
            return []

        case .primaryDisconnected(let now, let reason):
            connected = false
            // No one to answer: a primary that sent the handover stops for good on the link's
            // loss, and the takeover below goes by the witness as after any loss.
            pendingHandover = nil
            if state == .following && letPrimaryGo {
                // This node dropped it (its standby is down): no news of the primary.
                state = .primarySilent(sinceNanos: lastHeardNanos)
                return []
            }
            if state == .following {
                state = .primarySilent(sinceNanos: lastHeardNanos)
                return [.notice(.primaryLost(reason: reason))] + checkTakeover(now)
            }
            return []

        case .heardFromPrimary(let now):
            lastHeardNanos = max(lastHeardNanos, now)
            return []

        case .committed(let epoch, let now):
            precondition(epoch > committed, "commits only move forward")
            committed = epoch
            committedGeneration = generation
            committedIsCurrent = true
            replicaBroken = nil
            reportedCannotTakeOver = false
            lastHeardNanos = max(lastHeardNanos, now)
            if state == .waitingForFirstCheckpoint { state = connected ? .following : .primarySilent(sinceNanos: lastHeardNanos) }
            return [.acknowledge(epoch)]

        case .rejected(let epoch, let reason, let detail, _):
            if reason == .diskFailure {
                replicaBroken = "writing the replica disk failed at epoch \(epoch)\(detail.isEmpty ? "" : " (\(detail))"), so checkpoint \(committed) is no whole VM any more (its disk is part-way to the next epoch) until a full checkpoint commits"
            }
            return [.refuse(epoch, reason)]

        case .primaryStopped(let epoch, let reason, let now):
            // Only a primary that stopped at a checkpoint held here: one that names a later
            // epoch says it was acknowledged something this node never committed.
            guard connected, state == .following, epoch <= committed else { return [] }
            primaryStoppedItsGuest = true
            pendingHandover = nil
            state = .primarySilent(sinceNanos: now)
            // Closing says "heard" to the primary, which waits for it before it closes its end.
            return [.notice(.primaryStopped(epoch, reason: reason)), .dropLink(reason: "the primary stopped")] + checkTakeover(now)

        case .standbyHealth(let down, _):
            guard down != standbyDown else { return [] }
            let wasDown = standbyDown != nil
            standbyDown = down
            guard let why = down else { return wasDown ? [.notice(.standbyBack)] : [] }
            if wasDown { return [] }
            // Without a witness, the primary now runs unprotected and releases output past the
            // checkpoint held here: it is no state to resume any more (a witness's record says
            // the same where there is one).
            if config.arbitration == .none { committedIsCurrent = false }
            var actions: [Action] = [.notice(.standbyDown(reason: why))]
            if connected {
                letPrimaryGo = true
                actions.append(.dropLink(reason: "the standby reports \(why); the primary is let go until it answers again"))
            }
            return actions

        case .handoverRequested(let epoch, let now):
            // Only the exact checkpoint the primary paused at: anything else would resume a
            // different guest state than the one the primary stopped with.
            guard state == .following, connected else {
                return [.declineHandover(epoch, reason: "the secondary is not following the primary")]
            }
            guard epoch == committed else {
                return [.declineHandover(epoch, reason: "the secondary's last committed checkpoint is \(committed), not \(epoch)")]
            }
            // Without a witness the frame alone moves the VM: it is sealed with the pair key, so
            // only the primary can have sent it.
            guard config.arbitration != .none else { return acceptHandover() }
            guard pendingHandover == nil else { return [] }
            pendingHandover = (epoch, now)
            return handoverIfRecorded(now)

        case .witness(let view, let now):
            witness = view
            wonSinceNanos = view.quorate && !view.peerPresent ? (wonSinceNanos ?? now) : nil
            return handoverIfRecorded(now) + checkTakeover(now)

        case .tick(let now):
            let answer = handoverIfRecorded(now)
            if !answer.isEmpty { return answer }
            if state == .following && now >= lastHeardNanos && now - lastHeardNanos > config.takeoverAfterNanos {
                let reason = "primary silent for \((now - lastHeardNanos) / 1_000_000) ms"
                state = .primarySilent(sinceNanos: lastHeardNanos)
                return [.dropLink(reason: reason), .notice(.primaryLost(reason: reason))] + checkTakeover(now)
            }
            if state == .waitingForFirstCheckpoint && !connected && everConnected && !reportedCannotTakeOver
                && now - lastHeardNanos > config.takeoverAfterNanos {
                reportedCannotTakeOver = true
                return [.notice(.cannotTakeOver(reason: "the primary was lost before its first checkpoint was committed; nothing to resume"))]
            }
            return checkTakeover(now)
        }
    }

    private mutating func checkTakeover(_ now: UInt64) -> [Action] {
        guard case .primarySilent(let since) = state, now >= since,
              primaryStoppedItsGuest || now - since >= config.takeoverAfterNanos else { return [] }
        if let why = standbyDown ?? replicaBroken {
            // The standby-down notice said it all when this node let the primary go.
            guard !reportedCannotTakeOver, !(standbyDown != nil && letPrimaryGo) else { return [] }
            reportedCannotTakeOver = true
            let what = standbyDown != nil ? "the standby reports \(why)" : why
            return [.notice(.cannotTakeOver(reason: "\(what); nothing here can resume the VM. The VM is down: start it from the primary's host"))]
        }
        guard committedIsCurrent else {
            guard !reportedCannotTakeOver else { return [] }
            reportedCannotTakeOver = true
            return [.notice(.cannotTakeOver(reason: "the primary was lost while resynchronising after a reconnection; checkpoint \(committed) predates output it may have released unprotected, so resuming it could roll back what clients saw. The VM is down: start it from the primary's host, or resume checkpoint \(committed) by hand if you know the primary never ran unprotected"))]
        }
        if let timings = config.arbitration.timings {
            let waiting: String
            // The primary of this generation said (to the witness, or to this node in this
            // membership) that it stopped its guest for good: no stale quorum of its is left to
            // wait out, present in the cluster or not, and its record came with the word.
            let primaryStopped = witnessHasPrimaryStop
            let waitedOut = wonSinceNanos.map { now - $0 >= timings.takeoverWaitNanos } ?? false
            if let w = witness, primaryStopped || wonSinceNanos != nil {
                if primaryStopped || waitedOut {
                    guard w.witnessHeard || primaryStopped else {
                        return awaiting("this node won, but the witness has not published its record in this membership yet")
                    }
                    if let r = w.record, !r.allowsResuming(committed, at: committedGeneration) {
                        guard !reportedCannotTakeOver else { return [] }
                        reportedCannotTakeOver = true
                        return [.notice(.cannotTakeOver(reason: "the witness recorded \(r): checkpoint \(committed) held here is behind output the primary released unprotected, so resuming it would roll back what clients saw. The VM is down: start it from the primary's host"))]
                    }
                    return resume()
                }
                waiting = "this node won (quorate, the primary's node gone); waiting \(timings.takeoverWaitNanos / 1_000_000) ms for the primary's stale quorum to end and its self-fence"
            } else if let w = witness, !w.quorate {
                waiting = "this node is not quorate: the primary's side may hold the witness and run the VM"
            } else if witness == nil {
                waiting = "no word from the witness yet"
            } else {
                waiting = "the primary's node is still in the cluster: it may be alive with only the replication link down"
            }
            return awaiting(waiting)
        }
        return resume()
    }

    /// The witness view (quorate) holds the stop notice of this generation's primary: it will
    /// never run its guest again.
    private var witnessHasPrimaryStop: Bool {
        witness.map { $0.quorate && $0.stoppedGeneration == generation } ?? false
    }

    /// The waiting handover: accepted once the witness view shows the primary's stop notice,
    /// declined when the checkpoint moved on or the notice did not come within the bound (a
    /// frame alone, which the sealed link makes impossible to forge, still moves nothing).
    private mutating func handoverIfRecorded(_ now: UInt64) -> [Action] {
        guard let pending = pendingHandover else { return [] }
        guard state == .following, connected else {
            pendingHandover = nil
            return []
        }
        guard pending.epoch == committed else {
            pendingHandover = nil
            return [.declineHandover(pending.epoch, reason: "the secondary committed checkpoint \(committed) after the handover at \(pending.epoch) was asked for: the primary's guest did not stay paused")]
        }
        if witnessHasPrimaryStop {
            pendingHandover = nil
            return acceptHandover()
        }
        guard now >= pending.sinceNanos, now - pending.sinceNanos > config.handoverRecordWaitNanos else { return [] }
        pendingHandover = nil
        let view = witness.map { "\($0)" } ?? "no view yet"
        return [.declineHandover(pending.epoch, reason: "the witness view shows no stop notice of generation \(generation) after \(config.handoverRecordWaitNanos / 1_000_000) ms (\(view)); a handover needs the arbitration's record as well as the frame")]
    }

    private mutating func acceptHandover() -> [Action] {
        let newGeneration = generation.next
        state = .tookOver(from: committed, generation: newGeneration)
        generation = newGeneration
        return [.acceptHandover(from: committed, generation: newGeneration)]
    }

    private mutating func awaiting(_ why: String) -> [Action] {
        guard reportedAwaiting != why else { return [] }
        reportedAwaiting = why
        return [.notice(.awaitingArbitration(reason: why))]
    }

    private mutating func resume() -> [Action] {
        let newGeneration = generation.next
        state = .tookOver(from: committed, generation: newGeneration)
        generation = newGeneration
        return [.takeOver(from: committed, generation: newGeneration)]
    }
}
