import GeminusCore
import GeminusHypervisor
import Synchronization

/// One unit of guest output: a console line (or a simulated guest's packet) or an Ethernet frame
/// from the guest's NIC.
public enum GuestOutputItem: Sendable, Equatable {
    case line([UInt8])
    case frame([UInt8])
}

/// Where output goes once it may leave the host: the real destination sends console lines to
/// the output sink and frames to the host's network; the simulator's hands them to its checks.
public protocol OutputDestination: Sendable {
    /// `releasedThrough`: the acknowledged epoch that released `items` (called for every
    /// release, even an empty one), or nil for output that passed straight through unheld.
    func deliver(_ items: [GuestOutputItem], releasedThrough: Epoch?, generation: Generation)
    /// Frames sent on the host's network, and sends that failed (lost as on a network).
    var frameCounters: (sent: Int, failures: Int) { get }
    /// Released frames the host's network refused to send (not the guest's own source MAC, a
    /// bad length): spoofing attempts, counted for `geminus status`.
    var framesRefused: Int { get }
}

extension OutputDestination {
    public var frameCounters: (sent: Int, failures: Int) { (0, 0) }
    public var framesRefused: Int { 0 }
}

/// The guest's output port on a primary: console lines and NIC frames are held, in one
/// output-commit queue with one byte limit, while a secondary protects the VM, and pass
/// straight on while it is unprotected (promise S2).
public final class HeldOutputPort: GuestOutputPort, @unchecked Sendable {
    private let queue: Mutex<OutputQueue<GuestOutputItem>>
    private let destination: any OutputDestination
    public let generation: Generation

    public init(limitBytes: Int, destination: any OutputDestination, generation: Generation, openEpoch: Epoch) {
        queue = Mutex(OutputQueue(limitBytes: limitBytes, mode: .passThrough, openEpoch: openEpoch))
        self.destination = destination
        self.generation = generation
    }

    // Deliveries happen under the lock: an item passing straight through must never overtake
    // older items being released from the queue at the same moment. A real delivery is one
    // non-blocking sendto, so holding the lock across it is cheap.

    public func offer(_ packet: [UInt8]) -> Bool { offer(.line(packet), bytes: packet.count) }
    public func offerFrame(_ frame: [UInt8]) -> Bool { offer(.frame(frame), bytes: frame.count) }

    private func offer(_ item: GuestOutputItem, bytes: Int) -> Bool {
        queue.withLock { q in
            switch q.append(item, bytes: bytes) {
            case .held: return true
            case .releaseNow:
                destination.deliver([item], releasedThrough: nil, generation: generation)
                return true
            case .full: return false
            }
        }
    }

    /// Called while the guest is paused for the checkpoint of `epoch - 1`.
    public func open(epoch: Epoch, holding: Bool) {
        queue.withLock { q in
            if holding && q.mode == .passThrough { _ = q.setMode(.holding) }
            q.open(epoch: epoch)
        }
    }

    @discardableResult
    public func release(through epoch: Epoch) -> Int {
        queue.withLock { q in
            let items = q.release(through: epoch)
            destination.deliver(items, releasedThrough: epoch, generation: generation)
            return items.count
        }
    }

    /// Everything held leaves now, and output passes unheld from here on (unprotected).
    @discardableResult
    public func releaseAll() -> Int {
        queue.withLock { q in
            let items = q.setMode(.passThrough)
            if !items.isEmpty { destination.deliver(items, releasedThrough: nil, generation: generation) }
            return items.count
        }
    }

    /// A self-fence (`OutputQueue.fence`): drops everything held and refuses all output from
    /// now on (the guest stalls on its next packet until it is stopped). Returns the count dropped.
    @discardableResult
    public func fence() -> Int {
        queue.withLock { $0.fence() }
    }

    /// Whether output is held for a secondary (a replicated disk keeps its writes only then).
    public var isHolding: Bool { queue.withLock { $0.mode == .holding } }

    public struct Snapshot: Sendable {
        public var heldCount: Int
        public var heldBytes: Int
        public var fullRefusals: Int
        public var released: Int
        public var holding: Bool
        public var framesSent: Int
        public var frameSendFailures: Int
        public var framesRefused: Int
    }

    public var snapshot: Snapshot {
        let sent = destination.frameCounters
        let refused = destination.framesRefused
        return queue.withLock { q in
            Snapshot(heldCount: q.heldCount, heldBytes: q.heldBytes, fullRefusals: q.fullRefusals,
                     released: q.releasedCount, holding: q.mode == .holding,
                     framesSent: sent.sent, frameSendFailures: sent.failures, framesRefused: refused)
        }
    }
}
