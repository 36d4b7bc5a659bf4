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
///   full checkpoint.
public struct PrimaryMachine: Sendable {
    public struct Config: Sendable, Equatable {
        public var epochIntervalNanos: UInt64
        public var maxEpochsInFlight: Int
        /// No frame or heartbeat from the secondary for this long: the link is treated as lost.
        public var peerSilenceNanos: UInt64
        /// After losing the secondary, output stays held this long before the VM is declared
        /// unprotected and it is released (the secondary may still be taking over meanwhile).
        public var unprotectAfterNanos: UInt64

        public init(epochIntervalNanos: UInt64 = 25_000_000, maxEpochsInFlight: Int = 4,
                    peerSilenceNanos: UInt64 = 150_000_000, unprotectAfterNanos: UInt64 = 300_000_000) {
            self.epochIntervalNanos = epochIntervalNanos
            self.maxEpochsInFlight = maxEpochsInFlight
            self.peerSilenceNanos = peerSilenceNanos
            self.unprotectAfterNanos = unprotectAfterNanos
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
        case peerConnected(nowNanos: UInt64)
        case peerDisconnected(nowNanos: UInt64, reason: String)
        case heardFromPeer(nowNanos: UInt64)
        /// The capture asked for by `.capture` finished and the guest runs again.
        case captured(Epoch, nowNanos: UInt64)
        case acknowledged(Epoch, Generation, nowNanos: UInt64)
        case refused(Epoch, RejectReason, nowNanos: UInt64)
    }

    public enum Action: Equatable, Sendable {
        /// Pause the guest, copy the written pages (all when `full`) and the device state, tag
        /// new output with `epoch + 1` (holding it from now on), resume. Then feed `.captured`.
        case capture(Epoch, full: Bool)
        /// Encode the captured epoch against `base` and queue its frames to the secondary.
        case transmit(Epoch, base: Epoch)
        case releaseOutput(through: Epoch)
        /// Release everything held and let output pass unheld: nothing protects the VM.
        case releaseAllOutput
        case disconnect(reason: String)
        case notice(Notice)
    }

    public enum Notice: Equatable, Sendable {
        case protectionEstablished(Epoch)
        case unprotected(reason: String)
        case peerLost(reason: String)
        case resyncing(after: Epoch, RejectReason)
        case epochDeferred(inFlight: Int)
        case staleAck(Epoch, Generation)
    }

    public let config: Config
    public let generation: Generation
    public private(set) var protection: Protection = .unprotected
    public private(set) var lastCaptured: Epoch
    public private(set) var lastAcknowledged: Epoch
    /// The epoch the secondary will apply the next delta on (the last one transmitted).
    public private(set) var lastTransmitted: Epoch
    private var captureInProgress: Epoch?
    private var needsFull = true
    /// Nacks for epochs older than this are echoes of a failure already being repaired.
    private var ignoreNacksBefore: Epoch = .none
    private var nextEpochDueNanos: UInt64 = 0
    private var lastHeardNanos: UInt64 = 0
    /// Epochs that came due while `maxEpochsInFlight` were unacknowledged (each counted once).
    public private(set) var deferredEpochs = 0
    private var dueEpochDeferred = false
    public private(set) var staleAcks = 0

    /// - Parameter resumedFrom: the epoch a taken-over VM resumed from; numbering continues there.
    public init(config: Config, generation: Generation, resumedFrom: Epoch = .none) {
        precondition(config.epochIntervalNanos > 0 && config.maxEpochsInFlight > 0)
        self.config = config
        self.generation = generation
        lastCaptured = resumedFrom
        lastAcknowledged = resumedFrom
        lastTransmitted = resumedFrom
    }

    public var epochsInFlight: Int { Int(lastCaptured.rawValue - lastAcknowledged.rawValue) }

    public mutating func handle(_ event: Event) -> [Action] {
        switch event {
        case .peerConnected(let now):
            lastHeardNanos = now
            needsFull = true
            ignoreNacksBefore = lastCaptured.next
            // Acks from before this connection can no longer arrive; count from here.
            lastAcknowledged = lastCaptured
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
                if now >= lastHeardNanos && now - lastHeardNanos > config.peerSilenceNanos {
                    let reason = "secondary silent for \((now - lastHeardNanos) / 1_000_000) ms"
                    actions.append(.disconnect(reason: reason))
                    actions += losePeer(now, reason: reason)
                } else {
                    actions += captureIfDue(now)
                }
            case .peerLost(let since):
                if now - since >= config.unprotectAfterNanos {
                    protection = .unprotected
                    actions.append(.releaseAllOutput)
                    actions.append(.notice(.unprotected(reason: "no secondary for \((now - since) / 1_000_000) ms")))
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
                return [.transmit(epoch, base: base)] + captureIfDue(now)
            case .peerLost, .unprotected:
                // The link went while the guest was paused: nobody to send it to. The next
                // connection starts with a full checkpoint anyway.
                return []
            }

        case .acknowledged(let epoch, let gen, _):
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
            var actions: [Action] = [.releaseOutput(through: epoch)]
            if case .syncing(let full) = protection, epoch >= full {
                protection = .protected
                actions.append(.notice(.protectionEstablished(epoch)))
            }
            return actions

        case .refused(let epoch, let reason, let now):
            guard epoch >= ignoreNacksBefore else { return [] }
            switch protection {
            case .syncing, .protected:
                needsFull = true
                ignoreNacksBefore = lastCaptured.next
                protection = .syncing(fullEpoch: lastCaptured.next)
                return [.notice(.resyncing(after: epoch, reason))] + captureIfDue(now)
            case .peerLost, .unprotected:
                return []
            }
        }
    }

    private mutating func captureIfDue(_ now: UInt64) -> [Action] {
        guard captureInProgress == nil, now >= nextEpochDueNanos else { return [] }
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
        if full { protection = .syncing(fullEpoch: epoch) }
        return [.capture(epoch, full: full)]
    }

    private mutating func losePeer(_ now: UInt64, reason: String) -> [Action] {
        switch protection {
        case .syncing, .protected:
            protection = .peerLost(sinceNanos: now)
            return [.notice(.peerLost(reason: reason))]
        case .peerLost, .unprotected:
            return []
        }
    }
}
