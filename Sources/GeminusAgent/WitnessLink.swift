import Foundation
import GeminusCore
import GeminusReplication
import GeminusNode

/// The primary's fence watch: its own thread runs `PrimaryLease` against the witness view every
/// `tickNanos`, so a long capture or a stuck send in the epoch loop cannot delay a self-fence.
/// On `.selfFence` it calls `fence` once (which must stop the guest for good and discard held
/// output) and ends. While the primary holds the only copy (`PrimaryMachine.soleCopy`) nothing
/// fences; `arm` ends that before a secondary is given a checkpoint.
final class FenceWatch: LeaseControl, @unchecked Sendable {
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
