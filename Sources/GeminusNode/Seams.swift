import GeminusCore
import GeminusReplication

// The seams below the nodes. `PrimaryNode` and `SecondaryNode` hold every rule of their role;
// what they touch of the world goes through these small protocols, each with a real
// implementation (GeminusAgent: TCP, threads, the monotonic clock, Corosync) and a deterministic
// one (GeminusSimulation: a simulated clock, link, witness and guest). Nothing above a seam
// knows which side of it runs.

/// Time as the nodes see it: monotonic nanoseconds. Never the wall clock: a wall-clock jump
/// (NTP, an operator) must not make a secondary think its primary went silent.
public protocol NodeClock: AnyObject, Sendable {
    var nowNanos: UInt64 { get }
}

/// The host's monotonic clock.
public final class MonotonicClock: NodeClock {
    public init() {}
    public var nowNanos: UInt64 { Monotonic.nanos() }
}

/// What a link has for the node now.
public enum LinkInput: Sendable {
    case frame(Frame)
    /// Nothing waits now.
    case idle
    /// The link is unusable from here on. `corruptEpoch`: it broke on a frame of that epoch that
    /// failed its checksum (the secondary counts the epoch as corrupt).
    case broken(reason: String, corruptEpoch: Epoch?)
}

/// One authenticated connection to the pair's other agent, after its handshake. Heartbeats are
/// the link's own business: `receive` never returns one, `lastHeardNanos` counts them.
public protocol PeerLink: AnyObject {
    var remoteAddress: String { get }
    /// The secondary said at the handshake that it holds a resumable checkpoint (a primary's
    /// link; a secondary's says false).
    var peerHoldsCheckpoint: Bool { get }
    /// Queues one encoded frame. Throws when the link is gone or the frame could not be queued
    /// within the link's own bound.
    func send(_ frame: [UInt8]) throws(GeminusError)
    /// The next frame that arrived, without waiting.
    func receive() -> LinkInput
    /// When anything (frame or heartbeat) last arrived, on the node's clock.
    var lastHeardNanos: UInt64 { get }
    /// Waits at most `maxNanos` for input (the real link blocks; a simulated one returns at once).
    func waitForInput(maxNanos: UInt64)
    /// Waits at most `maxNanos` for what is queued to leave (a planned handover's last answer).
    func flush(maxNanos: UInt64)
    /// Closes at once (what is queued may be lost). Idempotent.
    func close()
}

/// How a primary gets links to its secondary: dialled in the background, handed over when up.
public protocol PeerDialer: AnyObject {
    /// A link that came up since the last call, if any.
    func take() -> (any PeerLink)?
    /// Dial again (after a loss, or after turning a link away).
    func redial()
    func stop()
}

/// What a dialling primary says about itself, judged by `SecondaryAdmission` before it is let in.
public struct AdmissionRequest: Sendable, Equatable {
    public var isPrimary: Bool
    public var vmName: String
    public var generation: Generation
    public var guestPageCount: UInt64
    public var platform: GuestPlatform

    public init(isPrimary: Bool, vmName: String, generation: Generation, guestPageCount: UInt64, platform: GuestPlatform) {
        self.isPrimary = isPrimary
        self.vmName = vmName
        self.generation = generation
        self.guestPageCount = guestPageCount
        self.platform = platform
    }
}

/// How a secondary gets links from its primary. The acceptor judges each dial with
/// `SecondaryAdmission` against what the node publishes (`SecondaryNode.admission`).
public protocol PeerAcceptor: AnyObject {
    func take() -> (link: any PeerLink, peer: AdmissionRequest)?
    /// No dial is accepted from now on (the node runs the VM itself, or stops).
    func stop()
}

/// The primary's fence watch as the epoch loop sees it: the lease runs elsewhere (its own thread
/// in the agent, the world's step in the simulator) so a long capture cannot delay a self-fence.
public protocol LeaseControl: AnyObject {
    /// Why the lease would fence now, or nil.
    var unhealthy: String? { get }
    /// Fences count again (a secondary is about to get a checkpoint). False when the lease fenced
    /// meanwhile or did not answer.
    func arm() -> Bool
    /// The primary holds the only copy again (its unprotect recorded): fences are held back.
    func releaseSoleCopy()
}

/// The agents' seam to the pair's witness engine: the current view, and a way to ask the witness
/// to record an announcement. `ClusterWitnessLink` implements it on Corosync; the simulator on its
/// model of the cluster. Called from several threads.
public protocol WitnessLink: AnyObject, Sendable {
    /// The latest view and a number that grows with every change (nil before the first one).
    var current: (view: WitnessView, version: UInt64)? { get }
    /// Asks the witness to record `record` (it answers in a later view's `record`).
    func announce(_ record: WitnessRecord)
    /// Asks the witness to record that this primary, of `generation`, stopped its guest for
    /// good (it answers in a later view's `stoppedGeneration`). Said only after the stop, or for
    /// a planned handover once the guest is paused never to run here again as `generation`.
    func announceStopped(_ generation: Generation)
    /// A primary keeps the ring lease: its state is republished every 100 ms, so that
    /// `lastOwnDeliveryNanos` shows whether its node's ring still works.
    func holdLease()
    /// When the cluster last delivered one of this node's own messages (monotonic), if ever.
    var lastOwnDeliveryNanos: UInt64? { get }
}

/// Feeds a machine only the views it has not seen.
public struct WitnessFeed: Sendable {
    private var version: UInt64?
    public init() {}

    public mutating func next(from link: (any WitnessLink)?) -> WitnessView? {
        guard let (view, v) = link?.current, v != version else { return nil }
        version = v
        return view
    }
}

/// Where the nodes' typed events go: the agent writes log lines and JSON, the simulator its trace.
public protocol NodeEventSink: AnyObject {
    func record(_ event: NodeEvent)
}
