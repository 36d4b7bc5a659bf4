#if canImport(Glibc)
import Glibc
#endif
import GeminusCore
import GeminusHypervisor
import Synchronization

/// Where released guest output goes: a UDP datagram per packet to the "network" (an observer
/// address in the demo and tests). Each datagram is prefixed with the generation of the primary
/// that released it, so an observer can tell the old primary's output from the new one's.
public final class OutputSink: @unchecked Sendable {
    private let fd: Int32
    private var address = sockaddr_in()
    public private(set) var packetsSent = 0

    public init(host: String, port: UInt16) throws(GeminusError) {
        fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw GeminusError(.io, "cannot create a UDP socket: \(String(cString: strerror(errno)))") }
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &address.sin_addr) == 1 else {
            close(fd)
            throw GeminusError(.invalidArgument, "output sink address '\(host)' is not an IPv4 address")
        }
    }

    deinit { close(fd) }

    public func send(_ packet: [UInt8], generation: Generation) {
        var w = ByteWriter(capacity: 8 + packet.count)
        w.u64(generation.rawValue)
        w.append(packet)
        let sent = w.bytes.withUnsafeBytes { buf in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, buf.baseAddress, buf.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        if sent >= 0 { packetsSent += 1 }
    }
}

/// One unit of held guest output: a console line (to the `OutputSink`) or an Ethernet frame
/// from the guest's NIC (to the host's network).
enum HeldOutput: Sendable {
    case line([UInt8])
    case frame([UInt8])
}

/// The guest's output port on a primary: console lines and NIC frames are held, in one
/// output-commit queue with one byte limit, while a secondary protects the VM, and pass
/// straight on while it is unprotected.
public final class HeldOutputPort: GuestOutputPort, @unchecked Sendable {
    private let queue: Mutex<OutputQueue<HeldOutput>>
    private let sink: OutputSink?
    private let network: HostNetwork?
    public let generation: Generation

    public init(limitBytes: Int, sink: OutputSink?, network: HostNetwork? = nil, generation: Generation, openEpoch: Epoch) {
        queue = Mutex(OutputQueue(limitBytes: limitBytes, mode: .passThrough, openEpoch: openEpoch))
        self.sink = sink
        self.network = network
        self.generation = generation
    }

    // Sends happen under the lock: an item passing straight through must never overtake
    // older items being released from the queue at the same moment. A send is one
    // non-blocking sendto, so holding the lock across it is cheap.

    public func offer(_ packet: [UInt8]) -> Bool { offer(.line(packet), bytes: packet.count) }
    public func offerFrame(_ frame: [UInt8]) -> Bool { offer(.frame(frame), bytes: frame.count) }

    private func offer(_ item: HeldOutput, bytes: Int) -> Bool {
        queue.withLock { q in
            switch q.append(item, bytes: bytes) {
            case .held: return true
            case .releaseNow:
                send(item)
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

    public func release(through epoch: Epoch) -> Int {
        queue.withLock { q in send(q.release(through: epoch)) }
    }

    public func releaseAll() -> Int {
        queue.withLock { q in send(q.setMode(.passThrough)) }
    }

    /// A self-fence (`OutputQueue.fence`): drops everything held and refuses all output from
    /// now on (the guest stalls on its next packet until it is stopped). Returns the count dropped.
    @discardableResult
    public func fence() -> Int {
        queue.withLock { $0.fence() }
    }

    private func send(_ items: [HeldOutput]) -> Int {
        for item in items { send(item) }
        return items.count
    }

    private func send(_ item: HeldOutput) {
        switch item {
        case .line(let p): sink?.send(p, generation: generation)
        case .frame(let f): network?.transmit(f)
        }
    }

    /// Whether output is held for a secondary (a replicated disk keeps its writes only then).
    public var isHolding: Bool { queue.withLock { $0.mode == .holding } }

    public struct Snapshot: Sendable {
        public var heldCount: Int
        public var heldBytes: Int
        public var fullRefusals: Int
        public var released: Int
        public var holding: Bool
        /// Released frames sent on the host's network, and sends that failed (lost as on a network).
        public var framesSent: Int
        public var frameSendFailures: Int
    }

    public var snapshot: Snapshot {
        let sent = network?.counters
        return queue.withLock { q in
            Snapshot(heldCount: q.heldCount, heldBytes: q.heldBytes, fullRefusals: q.fullRefusals,
                     released: q.releasedCount, holding: q.mode == .holding,
                     framesSent: sent?.sent ?? 0, frameSendFailures: sent?.sendFailures ?? 0)
        }
    }
}
