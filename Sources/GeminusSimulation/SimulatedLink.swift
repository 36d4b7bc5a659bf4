/// What travels on a simulated link: checkpoint-stream frames (bytes the real `FrameDecoder`
/// reads) and the connection events a TCP stack would report. Every packet belongs to one
/// connection; a node drops (and resets) packets of connections it does not know.
public enum LinkPacket: Sendable, Equatable {
    /// The primary dials, carrying its generation (the handshake's hello).
    case hello(connection: UInt64, generation: UInt64)
    case accepted(connection: UInt64)
    /// The handshake refused the primary: the reason, as the operator would read it.
    case refused(connection: UInt64, reason: String)
    /// One whole frame as encoded by `FrameCodec`.
    case frame(connection: UInt64, bytes: [UInt8])
    /// An orderly close (FIN).
    case close(connection: UInt64)
    /// A reset: the receiver has no such connection (it restarted, or closed it).
    case reset(connection: UInt64)

    public var connection: UInt64 {
        switch self {
        case .hello(let c, _), .accepted(let c), .refused(let c, _), .frame(let c, _), .close(let c), .reset(let c): return c
        }
    }

    var byteCount: Int {
        if case .frame(_, let b) = self { return b.count }
        return 64
    }
}

/// Faults a link applies to frames, per frame, as chances in a million. Connection events are
/// not lost, duplicated or corrupted (TCP retransmits its handshake and FIN), only delayed and
/// cut by partitions.
public struct LinkFaults: Sendable, Equatable {
    public var delayMinNanos: UInt64 = 200_000
    public var delayMaxNanos: UInt64 = 2_000_000
    public var reorderPerMillion: UInt64 = 0
    public var duplicatePerMillion: UInt64 = 0
    public var lossPerMillion: UInt64 = 0
    public var corruptPerMillion: UInt64 = 0

    public init() {}
}

/// One direction between the two hosts. Bounded: at most `capacityBytes` may be in flight or
/// waiting unread at the receiver, beyond which `send` refuses and the sender must keep the
/// frame (backpressure, the way a full TCP window stops `send`).
public struct SimulatedLink: Sendable {
    public let name: String
    public let capacityBytes: Int
    public var faults = LinkFaults()
    /// A partition cuts this direction: whatever is sent, and whatever is in flight, is lost.
    public private(set) var isCut = false
    public private(set) var queuedBytes = 0
    public private(set) var peakQueuedBytes = 0
    /// Counts of what the faults did, for the summary.
    public private(set) var lost = 0
    public private(set) var duplicated = 0
    public private(set) var reordered = 0
    public private(set) var corrupted = 0
    public private(set) var droppedByPartition = 0
    /// One-shot faults a scenario asks for ("corrupt next frame"): applied to the next frames.
    public var corruptNext = 0
    public var duplicateNext = 0
    public var reorderNext = 0
    public var loseNext = 0
    /// With `corruptNext`: flip a bit of this byte (8-11 are the header's length field) rather
    /// than of a random one.
    public var corruptNextAtByte: Int?

    private struct InFlight: Sendable {
        var at: UInt64
        var order: UInt64
        var packet: LinkPacket
    }
    private var inFlight: [InFlight] = []
    private var sentCount: UInt64 = 0
    /// Nothing is delivered before this: a link keeps order unless a reorder fault says otherwise.
    private var lastDeliveryNanos: UInt64 = 0

    public init(name: String, capacityBytes: Int) {
        precondition(capacityBytes > 0)
        self.name = name
        self.capacityBytes = capacityBytes
    }

    public var isEmpty: Bool { inFlight.isEmpty }
    public var hasRoom: Bool { queuedBytes < capacityBytes }

    public mutating func cut() {
        isCut = true
        droppedByPartition += inFlight.count
        inFlight.removeAll()
        queuedBytes = 0
    }

    public mutating func heal() { isCut = false }

    /// Queues `packet`; false when the link is full (the caller keeps it and retries).
    /// A packet sent into a partition is accepted and lost, as a cable that is cut takes it.
    @discardableResult
    public mutating func send(_ packet: LinkPacket, now: UInt64, rng: inout SimulationRandom) -> Bool {
        guard queuedBytes + packet.byteCount <= capacityBytes || inFlight.isEmpty else { return false }
        if isCut { droppedByPartition += 1; return true }
        var copies = 1
        var p = packet
        if case .frame(let c, var bytes) = packet {
            if loseNext > 0 || rng.chance(perMillion: faults.lossPerMillion) {
                loseNext = max(0, loseNext - 1)
                lost += 1
                return true
            }
            if corruptNext > 0 || rng.chance(perMillion: faults.corruptPerMillion) {
                let targeted = corruptNext > 0 ? corruptNextAtByte.map { min($0, bytes.count - 1) } : nil
                corruptNext = max(0, corruptNext - 1)
                if corruptNext == 0 { corruptNextAtByte = nil }
                bytes[targeted ?? Int(rng.next() % UInt64(bytes.count))] ^= UInt8(1 << (rng.next() % 8))
                corrupted += 1
                p = .frame(connection: c, bytes: bytes)
            }
            if duplicateNext > 0 || rng.chance(perMillion: faults.duplicatePerMillion) {
                duplicateNext = max(0, duplicateNext - 1)
                duplicated += 1
                copies = 2
            }
        }
        var at = max(now + rng.uniform(faults.delayMinNanos...max(faults.delayMinNanos, faults.delayMaxNanos)), lastDeliveryNanos)
        if case .frame = p, reorderNext > 0 || rng.chance(perMillion: faults.reorderPerMillion) {
            // Held back past the frames sent after it, without moving the link's order for them.
            reorderNext = max(0, reorderNext - 1)
            reordered += 1
            at += rng.uniform(1_000_000...5_000_000)
        } else {
            lastDeliveryNanos = at
        }
        for i in 0..<copies {
            sentCount += 1
            inFlight.append(InFlight(at: at + UInt64(i) * 100_000, order: sentCount, packet: p))
            queuedBytes += p.byteCount
        }
        peakQueuedBytes = max(peakQueuedBytes, queuedBytes)
        return true
    }

    /// The next packet due by `now`, in delivery order, or nil. The receiver reads at its own
    /// pace: what it does not read stays here and keeps counting against the capacity.
    public mutating func receive(now: UInt64) -> LinkPacket? {
        var best: Int?
        for i in inFlight.indices where inFlight[i].at <= now {
            if let b = best {
                if (inFlight[i].at, inFlight[i].order) < (inFlight[b].at, inFlight[b].order) { best = i }
            } else {
                best = i
            }
        }
        guard let b = best else { return nil }
        let p = inFlight.remove(at: b).packet
        queuedBytes -= p.byteCount
        return p
    }

    /// Everything still in flight for `connection` vanishes (the sender's host died with it
    /// still in its socket buffer, or the receiver reset the connection).
    public mutating func discard(connection: UInt64) {
        inFlight.removeAll { $0.packet.connection == connection }
        queuedBytes = inFlight.reduce(0) { $0 + $1.packet.byteCount }
    }
}
