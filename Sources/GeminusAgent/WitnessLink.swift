import Foundation
import GeminusCore
import GeminusReplication
import Logging

/// The agents' seam to the pair's witness engine: the current view, and a way to ask the witness
/// to record an announcement. `CorosyncWitnessLink` (geminus CLI) implements it on Corosync;
/// tests implement it by hand. Called from several threads.
public protocol WitnessLink: AnyObject, Sendable {
    /// The latest view and a number that grows with every change (nil before the first one).
    var current: (view: WitnessView, version: UInt64)? { get }
    /// Asks the witness to record `record` (it answers in a later view's `record`).
    func announce(_ record: WitnessRecord)
    /// Asks the witness to record that this primary, of `generation`, stopped its guest for
    /// good (it answers in a later view's `stoppedGeneration`). Said only after the stop.
    func announceStopped(_ generation: Generation)
    /// A primary keeps the ring lease: its state is republished every 100 ms, so that
    /// `lastOwnDeliveryNanos` shows whether its node's ring still works.
    func holdLease()
    /// When the cluster last delivered one of this node's own messages (monotonic), if ever.
    var lastOwnDeliveryNanos: UInt64? { get }
}

/// Feeds a machine only the views it has not seen.
struct WitnessFeed {
    private var version: UInt64?

    mutating func next(from link: (any WitnessLink)?) -> WitnessView? {
        guard let (view, v) = link?.current, v != version else { return nil }
        version = v
        return view
    }

    /// `next`, with each new view said in the log and the event stream (the agents' loops).
    mutating func nextReported(from link: (any WitnessLink)?, logger: Logger, events: EventLog) -> WitnessView? {
        guard let view = next(from: link) else { return nil }
        logger.info("witness: \(view)")
        events.emit("witness-view", ["quorate": view.quorate, "peerPresent": view.peerPresent, "witnessHeard": view.witnessHeard,
                                     "stoppedGeneration": view.stoppedGeneration.map { Int($0.rawValue) } ?? NSNull()])
        return view
    }
}

/// The primary's fence watch: its own thread runs `PrimaryLease` against the witness view every
/// `tickNanos`, so a long capture or a stuck send in the epoch loop cannot delay a self-fence.
/// On `.selfFence` it calls `fence` once (which must stop the guest for good and discard held
/// output) and ends. While the primary holds the only copy (`PrimaryMachine.soleCopy`) nothing
/// fences; `arm` ends that before a secondary is given a checkpoint.
final class FenceWatch: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false
    private var thread: Thread?
    private(set) var fenceReason: String?
    /// What the epoch loop says (`soleCopy`), and how many changes of it the watch has applied.
    private var wantSoleCopy: Bool
    private var requested = 0
    private var applied = 0
    private var unhealthyReason: String? = "not looked yet"

    init(link: any WitnessLink, timings: ArbitrationTimings, soleCopy: Bool, tickNanos: UInt64 = ArbitrationTimings.fenceTickNanos,
         fence: @escaping @Sendable (String) -> Void) {
        wantSoleCopy = soleCopy
        let t = Thread { [weak self] in
            var lease = PrimaryLease(timings: timings, watchesRing: true)
            var feed = WitnessFeed()
            link.holdLease()
            while let self, !self.isStopped {
                let now = Monotonic.nanos()
                var actions: [PrimaryLease.Action] = []
                let (want, request) = self.lock.withLock { (self.wantSoleCopy, self.requested) }
                if want != lease.soleCopy { actions += lease.handle(.soleCopy(want, nowNanos: now)) }
                if let delivered = link.lastOwnDeliveryNanos { actions += lease.handle(.ownDelivery(atNanos: delivered)) }
                actions += lease.handle(.tick(nowNanos: now))
                if let view = feed.next(from: link) { actions += lease.handle(.view(view, nowNanos: now)) }
                let unhealthy = lease.view == nil ? "no view from the witness yet" : lease.unhealthy(now)
                self.lock.withLock {
                    self.applied = request
                    self.unhealthyReason = unhealthy
                }
                for case .selfFence(let reason) in actions {
                    self.lock.withLock { self.fenceReason = reason }
                    fence(reason)
                    return
                }
                Monotonic.sleep(nanos: tickNanos)
            }
        }
        t.name = "geminus-fence-watch"
        thread = t
        t.start()
    }

    private var isStopped: Bool { lock.withLock { stopped } }

    var reason: String? { lock.withLock { fenceReason } }

    /// Why the lease would fence now (nil: it would not). A sole copy takes no secondary then:
    /// arming would stop the last copy.
    var unhealthy: String? { lock.withLock { unhealthyReason } }

    /// The primary holds the only copy again (its unprotect recorded): fences are held back.
    func releaseSoleCopy() {
        lock.withLock {
            wantSoleCopy = true
            requested += 1
        }
    }

    /// Before a secondary gets a checkpoint: fences count again, applied by the watch's own
    /// thread before this returns (within a tick or two). False when it fenced meanwhile or did
    /// not answer in a second.
    func arm() -> Bool {
        let target: Int = lock.withLock {
            wantSoleCopy = false
            requested += 1
            return requested
        }
        let deadline = Monotonic.nanos() + 1_000_000_000
        while Monotonic.nanos() < deadline {
            let (done, fenced) = lock.withLock { (applied >= target, fenceReason != nil) }
            if fenced { return false }
            if done { return true }
            Monotonic.sleep(nanos: 1_000_000)
        }
        return false
    }

    func stop() { lock.withLock { stopped = true } }
}
