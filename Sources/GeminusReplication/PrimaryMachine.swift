import GeminusCore

/// The primary's epoch loop as a state machine: events in, actions out, no I/O and no clock of
/// its own (time arrives inside events), so the agent, the tests and the simulator drive the
/// very same logic.
///
/// Invariants it keeps:
/// - epochs are captured in increasing order and the next one waits while `maxEpochsInFlight`
///   are unacknowledged (a slow secondary slows checkpoints, it never loses them);
/// - held output is released only through an acknowledged epoch, or all at once when the VM
///   has been declared unprotected (no secondary can resume it any more);
/// - any doubt about what the secondary holds (a new connection, a nack) is answered with a
///   full checkpoint; a secondary that holds epochs this primary never sent (an earlier run of
///   its agent) gets one numbered after them;
/// - liveness is judged by acknowledgements, not only by the link: a connected secondary that
///   acknowledges nothing for `ackTimeoutNanos` is lost like a silent one;
/// - a planned switchover pauses the guest for good only after the secondary has acknowledged
///   the final checkpoint, and the guest runs here again only if the secondary says it did not
///   take over: never while the secondary might be running it.
public struct PrimaryMachine: Sendable {
    public struct Config: Sendable, Equatable {
        public var epochIntervalNanos: UInt64
        public var maxEpochsInFlight: Int
        /// No frame or heartbeat from the secondary for this long: the link is treated as lost.
        public var peerSilenceNanos: UInt64
        /// After losing the secondary, output stays held this long before the VM is declared
        /// unprotected and it is released (the secondary may still be taking over meanwhile).
        public var unprotectAfterNanos: UInt64
        /// Planned switchover: how long the final checkpoint may wait for its acknowledgement
        /// (the guest is paused meanwhile) before the switchover is called off and the guest runs on.
        public var finalAckTimeoutNanos: UInt64
        /// Planned switchover: how long the secondary may take to report the guest running.
        public var takeoverConfirmTimeoutNanos: UInt64
        /// With a witness, running unprotected needs quorum and the witness's record of it
        /// (see `announceUnprotected`).
        public var arbitration: Arbitration
        /// The first copy to a secondary that holds no checkpoint is taken while the guest runs
        /// (`copyLive` rounds), then one short pause copies what is still dirty: the guest is
        /// never paused for a whole copy of its RAM. Without it, or when the secondary may
        /// still hold a checkpoint worth keeping, the full copy is taken paused.
        public var liveFirstCopy: Bool
        /// At most this many live rounds (the first copies everything, each next one what the
        /// guest wrote meanwhile) before the pause.
        public var liveRoundsMax: Int
        /// A live round that copied at most this many pages is the last one: the pause copies
        /// what is left.
        public var liveStopPages: Int
        /// The guest's full copy can only be taken live (a disk too large to carry in one
        /// paused epoch streams while the guest runs): every full copy is live, even when the
        /// secondary may hold a checkpoint (it loses it; docs/DISKS.md says what that costs).
        public var fullCopyMustBeLive: Bool = false
        /// The secondary's silence tolerated while a live first copy runs (before its pause).
        /// Nothing is held for it then (output passes until the pause's checkpoint), so a long
        /// bound costs no latency, and a stall of either side under the copy's load (a
        /// multi-GiB disk applied on the secondary, two busy cores) does not restart a copy of
        /// many seconds.
        public var liveCopySilenceNanos: UInt64 = 2_000_000_000
        /// A secondary that is connected (its link's heartbeats arrive) but acknowledges nothing
        /// for this long while epochs wait is lost: its apply loop hangs (a replica disk on hung
        /// storage, a stuck standby), and held output must not wait for it forever. The same
        /// bound a planned switchover holds its paused guest for its final acknowledgement
        /// (`finalAckTimeoutNanos`, whose default it takes): a secondary that cannot
        /// acknowledge within it could not take a switchover either. Counted from the oldest
        /// unacknowledged epoch's send, or from the last acknowledgement.
        public var ackTimeoutNanos: UInt64
        /// The same while a full copy is unacknowledged: it carries the whole guest (RAM and
        /// disk) through the link and the secondary's apply, which takes seconds for a large
        /// guest, so the bound is generous; a hung secondary is still lost in the end.
        public var fullCopyAckTimeoutNanos: UInt64 = 60_000_000_000

        public init(epochIntervalNanos: UInt64 = 25_000_000, maxEpochsInFlight: Int = 4,
                    peerSilenceNanos: UInt64 = 150_000_000, unprotectAfterNanos: UInt64 = 300_000_000,
                    finalAckTimeoutNanos: UInt64 = 2_000_000_000, takeoverConfirmTimeoutNanos: UInt64 = 20_000_000_000,
                    arbitration: Arbitration = .none, liveFirstCopy: Bool = false, liveRoundsMax: Int = 5, liveStopPages: Int = 2048) {
            self.arbitration = arbitration
            self.liveFirstCopy = liveFirstCopy
            self.liveRoundsMax = liveRoundsMax
            self.liveStopPages = liveStopPages
            self.epochIntervalNanos = epochIntervalNanos
            self.maxEpochsInFlight = maxEpochsInFlight
            self.peerSilenceNanos = peerSilenceNanos
            self.unprotectAfterNanos = unprotectAfterNanos
            self.finalAckTimeoutNanos = finalAckTimeoutNanos
            self.ackTimeoutNanos = finalAckTimeoutNanos
            self.takeoverConfirmTimeoutNanos = takeoverConfirmTimeoutNanos
        }
    }

    public enum Protection: Equatable, Sendable {
        /// No secondary: checkpoints stop and output passes straight through.
        case unprotected
        /// Connected; the full checkpoint `fullEpoch` is on its way and not yet acknowledged.
        case syncing(fullEpoch: Epoch)
        /// The secondary holds an acknowledged checkpoint and follows epoch by epoch.
        case protected
        /// The link was lost at `sinceNanos`; output is held until `unprotectAfterNanos`.
        case peerLost(sinceNanos: UInt64)
    }

    public enum Event: Equatable, Sendable {
        case tick(nowNanos: UInt64)
        /// `peerHoldsCheckpoint`: the secondary said at the handshake that it holds a resumable
        /// checkpoint (then its first copy is paused, so that checkpoint stays whole until the
        /// new one commits).
        case peerConnected(nowNanos: UInt64, peerHoldsCheckpoint: Bool = true)
        case peerDisconnected(nowNanos: UInt64, reason: String)
        case heardFromPeer(nowNanos: UInt64)
        /// The capture asked for by `.capture` finished and the guest runs again.
        case captured(Epoch, nowNanos: UInt64)
        /// The live round asked for by `.copyLive` finished; it copied `pages` pages.
        /// `devicesPending`: a device's own first copy (a disk streaming through its mirror) is
        /// still under way, so the pause cannot end the live copy yet.
        case liveCopied(Epoch, pages: Int, devicesPending: Bool = false, nowNanos: UInt64)
        /// The frames asked for by `.transmit` are all queued: the secondary can have the epoch
        /// from now on (a full copy of a large guest takes seconds to send).
        case transmitted(Epoch, nowNanos: UInt64)
        case acknowledged(Epoch, Generation, nowNanos: UInt64)
        /// A nack. For `.stale`, `Epoch` is the newest epoch the secondary holds (it refused an
        /// epoch at or below it); for every other reason, the epoch refused.
        case refused(Epoch, RejectReason, nowNanos: UInt64)
        /// The operator asked for a planned switchover to the secondary.
        case switchoverRequested(nowNanos: UInt64)
        /// The secondary runs the guest now, as `Generation`.
        case handoverConfirmed(Generation, nowNanos: UInt64)
        case handoverDeclined(reason: String, nowNanos: UInt64)
        /// What the witness says now (with `Arbitration.witness`). A view whose record holds the
        /// announcement asked for by `.announceUnprotected` lets the primary run unprotected.
        case witness(WitnessView, nowNanos: UInt64)
    }

    /// Where a planned switchover is. The guest is paused from the final capture on.
    public enum Switchover: Equatable, Sendable {
        /// Asked for; the final capture follows the one in progress.
        case requested
        /// The final epoch is captured and sent; the guest stays paused until it is acknowledged.
        case awaitingFinalAck(Epoch, sinceNanos: UInt64)
        /// The secondary acknowledged it and was told to take over.
        case awaitingTakeover(Epoch, sinceNanos: UInt64)
        /// The secondary runs the guest (confirmed), or may (the link went after the handover
        /// was sent); either way it must never run here again.
        case handedOver(Epoch, confirmedGeneration: Generation?)
    }

    public enum Action: Equatable, Sendable {
        /// Pause the guest, copy the written pages (all when `full`) and the device state, tag
        /// new output with `epoch + 1` (holding it from now on), resume. Then feed `.captured`.
        case capture(Epoch, full: Bool)
        /// While the guest runs: copy every page (`full`) or those written since the last round,
        /// without device state; the epoch is a base for the next, never resumable. Then feed
        /// `.liveCopied`.
        case copyLive(Epoch, full: Bool)
        /// Encode the captured epoch against `base` and queue its frames to the secondary.
        case transmit(Epoch, base: Epoch)
        case releaseOutput(through: Epoch)
        /// Release everything held and let output pass unheld: nothing protects the VM.
        case releaseAllOutput
        case disconnect(reason: String)
        /// Planned switchover: pause the guest, capture the final epoch, and leave it paused.
        /// Then feed `.captured`.
        case captureFinal(Epoch)
        /// Tell the secondary to resume the guest from `epoch` (it has acknowledged it). With a
        /// witness, the stop notice of this generation goes to the witness first: the secondary
        /// resumes only once its witness view shows it, and from then on the guest can never run
        /// here again as this generation.
        case handOver(Epoch)
        /// The switchover was called off: run the guest that `captureFinal` left paused.
        case resumeGuest
        /// The guest runs on the secondary now (or may): stop it here for good. Nothing follows.
        case finishHandover(Epoch, confirmedGeneration: Generation?)
        /// With a witness: ask the witness to record that this generation runs unprotected after
        /// `after`, so a secondary that still holds checkpoint `after` or older never resumes it
        /// (it would un-send what is released next). Output stays held until a witness view
        /// shows the record.
        case announceUnprotected(generation: Generation, after: Epoch)
        case notice(Notice)
    }

    public enum Notice: Equatable, Sendable {
        case protectionEstablished(Epoch)
        case unprotected(reason: String)
        case peerLost(reason: String)
        case resyncing(after: Epoch, RejectReason)
        /// The secondary holds epoch `Epoch` of this generation, which this primary never sent
        /// (an earlier run of this primary's agent sent it): numbering continues after it.
        case continuesAfter(Epoch)
        case epochDeferred(inFlight: Int)
        case staleAck(Epoch, Generation)
        case switchoverRefused(reason: String)
        case switchoverAborted(reason: String)
        /// With a witness: the secondary declined the handover after this primary's stop notice
        /// went to the witness. The notice is final, so the guest is stopped here for good and
        /// the secondary takes over by it (`finishHandover` follows).
        case handoverDeclinedAfterStopNotice(Epoch, reason: String)
    }

    public let config: Config
    public let generation: Generation
    public private(set) var protection: Protection = .unprotected
    /// No other host holds a checkpoint of this generation that it may resume: this node took
    /// the VM over (or was handed it) and has connected no secondary since, or the witness has
    /// recorded its unprotect (which forbids every older checkpoint of the generation). Its
    /// lease then does not fence (`PrimaryLease.soleCopy`): that would destroy the last copy.
    /// A fresh start is not one: an earlier agent's secondary may hold this generation.
    public private(set) var soleCopy: Bool
    public private(set) var lastCaptured: Epoch
    public private(set) var lastAcknowledged: Epoch
    /// The epoch the secondary will apply the next delta on (the last one transmitted).
    public private(set) var lastTransmitted: Epoch
    private var captureInProgress: Epoch?
    private var needsFull = true
    /// The next full copy may be live (the secondary holds no checkpoint to keep).
    private var nextFullMayBeLive = false
    /// What the secondary said at the handshake: it holds a resumable checkpoint.
    private var peerHoldsCheckpoint = true
    /// The live first copy under way: rounds done, pages of the last, whether another follows.
    public private(set) var liveCopy: LiveCopy?

    public struct LiveCopy: Equatable, Sendable {
        public var rounds: Int
        public var lastPages: Int
        public var another: Bool
    }
    /// Nacks for epochs older than this are echoes of a failure already being repaired.
    private var ignoreNacksBefore: Epoch = .none
    private var nextEpochDueNanos: UInt64 = 0
    private var lastHeardNanos: UInt64 = 0
    /// Since when the oldest unacknowledged epoch sent has waited (nil: nothing waits), and that
    /// epoch while its frames are still being queued (its wait starts once they are).
    private var ackWaitSinceNanos: UInt64?
    private var ackWaitEpoch: Epoch?
    /// Epochs that came due while `maxEpochsInFlight` were unacknowledged (each counted once).
    public private(set) var deferredEpochs = 0
    private var dueEpochDeferred = false
    public private(set) var staleAcks = 0
    public private(set) var switchover: Switchover?
    public private(set) var witness: WitnessView?
    /// The epoch an unprotected announcement on its way names (with a witness).
    public private(set) var announcing: Epoch?

    /// - Parameter resumedFrom: the epoch a taken-over VM resumed from; numbering continues there.
    public init(config: Config, generation: Generation, resumedFrom: Epoch = .none) {
        precondition(config.epochIntervalNanos > 0 && config.maxEpochsInFlight > 0)
        self.config = config
        self.generation = generation
        lastCaptured = resumedFrom
        lastAcknowledged = resumedFrom
        lastTransmitted = resumedFrom
        soleCopy = resumedFrom != .none
    }

    public var epochsInFlight: Int { Int(lastCaptured.rawValue - lastAcknowledged.rawValue) }

    public mutating func handle(_ event: Event) -> [Action] {
        if case .handedOver = switchover { return [] }
        switch event {
        case .peerConnected(let now, let peerHoldsCheckpoint):
            nextFullMayBeLive = config.liveFirstCopy && (!peerHoldsCheckpoint || config.fullCopyMustBeLive)
            self.peerHoldsCheckpoint = peerHoldsCheckpoint
            liveCopy = nil
            // The secondary will hold this generation's checkpoints from now on. (The agent has
            // armed the lease before it hands over a connection: `FenceWatch.arm`.)
            soleCopy = false
            announcing = nil
            lastHeardNanos = now
            needsFull = true
            ignoreNacksBefore = lastCaptured.next
            // Acks from before this connection can no longer arrive; count from here.
            lastAcknowledged = lastCaptured
            ackWaitSinceNanos = nil
            nextEpochDueNanos = now
            protection = .syncing(fullEpoch: lastCaptured.next)
            return captureIfDue(now)

        case .peerDisconnected(let now, let reason):
            return losePeer(now, reason: reason)

        case .heardFromPeer(let now):
            lastHeardNanos = max(lastHeardNanos, now)
            return []

        case .tick(let now):
            var actions: [Action] = []
            switch protection {
            case .syncing, .protected:
                if let timeout = switchoverTimeout(now) { return timeout }
                let bound = liveCopy != nil ? max(config.peerSilenceNanos, config.liveCopySilenceNanos) : config.peerSilenceNanos
                if now >= lastHeardNanos && now - lastHeardNanos > bound {
                    let reason = "secondary silent for \((now - lastHeardNanos) / 1_000_000) ms"
                    actions.append(.disconnect(reason: reason))
                    actions += losePeer(now, reason: reason)
                } else if let reason = acknowledgementOverdue(now) {
                    actions.append(.disconnect(reason: reason))
                    actions += losePeer(now, reason: reason)
                } else {
                    actions += captureIfDue(now)
                }
            case .peerLost(let since):
                if now - since >= config.unprotectAfterNanos {
                    if config.arbitration == .none {
                        actions += unprotect(reason: "no secondary for \((now - since) / 1_000_000) ms")
                    } else if announcing == nil {
                        announcing = lastCaptured
                        actions.append(.announceUnprotected(generation: generation, after: lastCaptured))
                        actions += unprotectIfRecorded(now)
                    }
                }
            case .unprotected:
                break
            }
            return actions

        case .captured(let epoch, let now):
            precondition(captureInProgress == epoch, "captured an epoch that was not asked for")
            captureInProgress = nil
            switch protection {
            case .syncing(let full) where epoch < full:
                // A delta captured before the (re)connection: the secondary first needs the
                // full checkpoint, which is already requested.
                return captureIfDue(now)
            case .syncing, .protected:
                let base = lastTransmitted
                lastTransmitted = epoch
                startAckWait(epoch, now)
                if case .awaitingFinalAck(epoch, _) = switchover {
                    return [.transmit(epoch, base: base)]
                }
                return [.transmit(epoch, base: base)] + captureIfDue(now)
            case .peerLost, .unprotected:
                // The link went while the guest was paused: nobody to send it to. The next
                // connection starts with a full checkpoint anyway.
                if case .awaitingFinalAck = switchover {
                    switchover = nil
                    return [.resumeGuest, .notice(.switchoverAborted(reason: "the link to the secondary went during the final checkpoint"))]
                }
                return []
            }

        case .liveCopied(let epoch, let pages, let devicesPending, let now):
            precondition(captureInProgress == epoch, "copied an epoch that was not asked for")
            captureInProgress = nil
            guard var live = liveCopy else { return [] }
            switch protection {
            case .syncing, .protected:
                let base = lastTransmitted
                lastTransmitted = epoch
                startAckWait(epoch, now)
                live.rounds += 1
                // Another round while it shrinks the copy the pause must make; the first round
                // copied everything, so what the guest wrote meanwhile is unknown yet: go on.
                // A device still copying (a disk) keeps the rounds going, however many: the
                // pause must find it caught up, or it would carry the rest of the disk.
                live.another = devicesPending || (live.rounds < config.liveRoundsMax
                    && (live.rounds == 1 || (pages > config.liveStopPages && pages < live.lastPages)))
                live.lastPages = pages
                liveCopy = live
                // The next round, or the pause, follows at once; while only a device is still
                // copying, rounds keep the epoch cadence (each costs a pass over the written set).
                nextEpochDueNanos = devicesPending ? now + config.epochIntervalNanos : now
                return [.transmit(epoch, base: base)] + captureIfDue(now)
            case .peerLost, .unprotected:
                liveCopy = nil
                return []
            }

        case .transmitted(let epoch, let now):
            if epoch == ackWaitEpoch, ackWaitSinceNanos != nil {
                ackWaitSinceNanos = now
                ackWaitEpoch = nil
            }
            return []

        case .acknowledged(let epoch, let gen, let now):
            guard gen == generation else {
                staleAcks += 1
                return [.notice(.staleAck(epoch, gen))]
            }
            guard epoch > lastAcknowledged else { return [] }
            guard epoch <= lastTransmitted else {
                return [.disconnect(reason: "secondary acknowledged epoch \(epoch), which was never sent (last sent \(lastTransmitted))")]
                    + losePeer(lastHeardNanos, reason: "protocol violation")
            }
            lastAcknowledged = epoch
            // The secondary is applying: the next epoch waiting gets a full bound from here.
            ackWaitSinceNanos = epoch < lastTransmitted ? now : nil
            ackWaitEpoch = nil
            var actions: [Action] = [.releaseOutput(through: epoch)]
            // A live round's acknowledgement makes room in the window, nothing more: it is no checkpoint.
            if case .syncing(let full) = protection, liveCopy == nil, epoch >= full {
                protection = .protected
                actions.append(.notice(.protectionEstablished(epoch)))
            }
            if case .awaitingFinalAck(let final, _) = switchover, epoch >= final {
                switchover = .awaitingTakeover(final, sinceNanos: now)
                actions.append(.handOver(final))
            }
            return actions

        case .refused(let held, .stale, let now):
            // Only news when the secondary holds epochs this primary never sent: an earlier
            // run of this agent numbered them (a restart starts over at epoch 1). Otherwise it
            // is the echo of a duplicated frame, which changes nothing.
            guard held > lastCaptured else { return [] }
            switch protection {
            case .syncing, .protected:
                return continueNumbering(after: held, now)
            case .peerLost, .unprotected:
                return []
            }

        case .refused(let epoch, let reason, let now):
            guard epoch >= ignoreNacksBefore else { return [] }
            switch protection {
            case .syncing, .protected:
                needsFull = true
                ackWaitSinceNanos = nil
                // The secondary may still hold its last checkpoint: the new copy is paused
                // (unless the guest can only be copied live).
                nextFullMayBeLive = config.liveFirstCopy && config.fullCopyMustBeLive
                liveCopy = nil
                ignoreNacksBefore = lastCaptured.next
                protection = .syncing(fullEpoch: lastCaptured.next)
                var actions: [Action] = [.notice(.resyncing(after: epoch, reason))]
                if case .awaitingFinalAck = switchover {
                    switchover = nil
                    actions += [.resumeGuest, .notice(.switchoverAborted(reason: "the secondary refused the final checkpoint (\(reason)); resynchronising"))]
                }
                return actions + captureIfDue(now)
            case .peerLost, .unprotected:
                return []
            }

        case .switchoverRequested(let now):
            guard switchover == nil else { return [.notice(.switchoverRefused(reason: "a switchover is already under way"))] }
            guard protection == .protected else {
                let why: String
                switch protection {
                case .syncing: why = "the secondary does not hold a whole checkpoint yet (full copy under way)"
                case .peerLost: why = "the link to the secondary is down"
                default: why = "no secondary protects this VM"
                }
                return [.notice(.switchoverRefused(reason: why))]
            }
            switchover = .requested
            return captureFinalIfIdle(now)

        case .handoverConfirmed(let gen, _):
            guard case .awaitingTakeover(let final, _) = switchover else { return [] }
            guard gen > generation else {
                return [.disconnect(reason: "the secondary confirmed the takeover with generation \(gen), not newer than \(generation)")]
                    + finishUnconfirmed(final)
            }
            switchover = .handedOver(final, confirmedGeneration: gen)
            return [.finishHandover(final, confirmedGeneration: gen)]

        case .witness(let view, let now):
            witness = view
            return unprotectIfRecorded(now)

        case .handoverDeclined(let reason, let now):
            guard case .awaitingTakeover(let final, _) = switchover else { return [] }
            if config.arbitration != .none {
                // The witness keeps the stop notice sent with the handover, and a secondary
                // that sees it resumes without waiting out the primary's stale quorum: running
                // the guest here again as this generation could run it twice.
                return [.notice(.handoverDeclinedAfterStopNotice(final, reason: reason))] + finishUnconfirmed(final)
            }
            switchover = nil
            nextEpochDueNanos = now
            return [.resumeGuest, .notice(.switchoverAborted(reason: "the secondary declined: \(reason)"))] + captureIfDue(now)
        }
    }

    /// `epoch` goes out; when nothing else waits for an acknowledgement, its wait starts now (and
    /// again when `.transmitted` says its last frame is queued).
    private mutating func startAckWait(_ epoch: Epoch, _ now: UInt64) {
        guard ackWaitSinceNanos == nil else { return }
        ackWaitSinceNanos = now
        ackWaitEpoch = epoch
    }

    /// Why the connected secondary counts as lost for want of acknowledgements, or nil. A planned
    /// switchover has its own bound for its final checkpoint.
    private func acknowledgementOverdue(_ now: UInt64) -> String? {
        guard switchover == nil, let since = ackWaitSinceNanos, now >= since else { return nil }
        let full: Bool
        if case .syncing = protection { full = true } else { full = false }
        let bound = full ? config.fullCopyAckTimeoutNanos : config.ackTimeoutNanos
        guard now - since > bound else { return nil }
        return "the secondary acknowledged nothing for \((now - since) / 1_000_000) ms (over \(bound / 1_000_000) ms) with \(epochsInFlight) epochs in flight, although its link is alive: its apply loop hangs"
    }

    /// The secondary holds epoch `held` of this generation from an earlier run of this agent:
    /// a full checkpoint numbered after it replaces it (the epochs it holds only grow).
    private mutating func continueNumbering(after held: Epoch, _ now: UInt64) -> [Action] {
        lastCaptured = held
        lastTransmitted = held
        // Nothing of the earlier numbering will be acknowledged; output held for it goes with
        // the acknowledgement of the full checkpoint that follows.
        lastAcknowledged = held
        ackWaitSinceNanos = nil
        needsFull = true
        // The replacement is copied as the first copy of this connection would have been.
        nextFullMayBeLive = config.liveFirstCopy && (!peerHoldsCheckpoint || config.fullCopyMustBeLive)
        liveCopy = nil
        ignoreNacksBefore = held.next
        protection = .syncing(fullEpoch: held.next)
        nextEpochDueNanos = now
        dueEpochDeferred = false
        return [.notice(.continuesAfter(held))] + captureIfDue(now)
    }

    /// With a witness, unprotected only once the witness has recorded the announcement, and
    /// only while quorate: without quorum the other side may win (the fence watch stops the guest).
    private mutating func unprotectIfRecorded(_ now: UInt64) -> [Action] {
        guard let after = announcing, case .peerLost(let since) = protection, let w = witness, w.quorate, w.witnessHeard,
              let record = w.record, record.generation == generation, record.unprotectedAfter >= after else { return [] }
        announcing = nil
        soleCopy = true
        let peer = w.peerPresent ? "its node is in the cluster but the replication link is down" : "its node left the cluster"
        return unprotect(reason: "no secondary for \((now - min(now, since)) / 1_000_000) ms (\(peer)); the witness recorded it and this node is quorate")
    }

    private mutating func unprotect(reason: String) -> [Action] {
        protection = .unprotected
        return [.releaseAllOutput, .notice(.unprotected(reason: reason))]
    }

    /// The final capture, once no other capture is in progress.
    private mutating func captureFinalIfIdle(_ now: UInt64) -> [Action] {
        guard switchover == .requested, captureInProgress == nil else { return [] }
        let epoch = lastCaptured.next
        lastCaptured = epoch
        captureInProgress = epoch
        switchover = .awaitingFinalAck(epoch, sinceNanos: now)
        return [.captureFinal(epoch)]
    }

    /// The handover was sent but its outcome is unknown: the secondary holds the final
    /// checkpoint and takes over on its own once this side goes quiet, so the guest must
    /// not run here again.
    private mutating func finishUnconfirmed(_ final: Epoch) -> [Action] {
        switchover = .handedOver(final, confirmedGeneration: nil)
        return [.finishHandover(final, confirmedGeneration: nil)]
    }

    private mutating func switchoverTimeout(_ now: UInt64) -> [Action]? {
        switch switchover {
        case .awaitingFinalAck(_, let since) where now >= since && now - since > config.finalAckTimeoutNanos:
            switchover = nil
            nextEpochDueNanos = now
            return [.resumeGuest, .notice(.switchoverAborted(reason: "the final checkpoint was not acknowledged within \(config.finalAckTimeoutNanos / 1_000_000) ms"))]
                + captureIfDue(now)
        case .awaitingTakeover(let final, let since) where now >= since && now - since > config.takeoverConfirmTimeoutNanos:
            return [.disconnect(reason: "the secondary did not confirm the takeover within \(config.takeoverConfirmTimeoutNanos / 1_000_000) ms")]
                + finishUnconfirmed(final)
        default:
            return nil
        }
    }

    private mutating func captureIfDue(_ now: UInt64) -> [Action] {
        if switchover == .requested { return captureFinalIfIdle(now) }
        guard switchover == nil, captureInProgress == nil, now >= nextEpochDueNanos else { return [] }
        guard epochsInFlight < config.maxEpochsInFlight else {
            guard !dueEpochDeferred else { return [] }
            dueEpochDeferred = true
            deferredEpochs += 1
            return [.notice(.epochDeferred(inFlight: epochsInFlight))]
        }
        dueEpochDeferred = false
        let epoch = lastCaptured.next
        let full = needsFull
        needsFull = false
        lastCaptured = epoch
        captureInProgress = epoch
        // Keep a steady cadence; after a long stall start afresh rather than burst.
        nextEpochDueNanos = max(nextEpochDueNanos + config.epochIntervalNanos, now)
        if full {
            protection = .syncing(fullEpoch: epoch)
            if nextFullMayBeLive {
                nextFullMayBeLive = false
                liveCopy = LiveCopy(rounds: 0, lastPages: .max, another: true)
                return [.copyLive(epoch, full: true)]
            }
        } else if let live = liveCopy {
            if live.another { return [.copyLive(epoch, full: false)] }
            // The pause that ends the live copy: its epoch is the first whole checkpoint.
            liveCopy = nil
            protection = .syncing(fullEpoch: epoch)
        }
        return [.capture(epoch, full: full)]
    }

    private mutating func losePeer(_ now: UInt64, reason: String) -> [Action] {
        switch protection {
        case .syncing, .protected:
            protection = .peerLost(sinceNanos: now)
            liveCopy = nil
            ackWaitSinceNanos = nil
            switch switchover {
            case .awaitingTakeover(let final, _):
                return [.notice(.peerLost(reason: reason))] + finishUnconfirmed(final)
            case .awaitingFinalAck:
                // Not acknowledged, so not handed over: the secondary can only take over by
                // silence, as after any link loss (held output waits for that as always).
                switchover = nil
                return [.notice(.peerLost(reason: reason)), .resumeGuest,
                        .notice(.switchoverAborted(reason: "the link to the secondary went before the final checkpoint was acknowledged"))]
            case .requested:
                switchover = nil
                return [.notice(.peerLost(reason: reason)), .notice(.switchoverAborted(reason: "the link to the secondary went"))]
            case nil, .handedOver:
                return [.notice(.peerLost(reason: reason))]
            }
        case .peerLost, .unprotected:
            return []
        }
    }
}
