import GeminusCore
import GeminusHypervisor

/// A primary-side encoder and a secondary-side replica wired back to back through frame
/// bytes, with a simulated guest to produce realistic checkpoints.
final class Pipeline {
    let guest: SimulatedGuest
    let encoder: CheckpointEncoder
    let replica: Replica
    let buffer: CheckpointBuffer
    var epoch = Epoch.none
    var lastSent = Epoch.none
    let generation = Generation(1)

    init(ramMiB: Int = 1, content: PageContent = .mixed, seed: UInt64 = 7, disk: (any ReplicaDisk)? = nil) throws {
        let workload = SimulatedWorkload(ramMiB: ramMiB, dirtyPagesPerSecond: 10_000, content: content, outputsPerSecond: 100, seed: seed)
        guest = try SimulatedGuest(workload: workload, memory: PageMemory(pageCount: workload.pageCount))
        encoder = try CheckpointEncoder(pageCount: workload.pageCount, maxFramePayload: 64 << 10)
        replica = Replica(memory: try PageMemory(pageCount: workload.pageCount), disk: disk)
        buffer = CheckpointBuffer(limitPages: workload.pageCount)
    }

    /// Runs the guest `steps` steps, captures, and returns the encoded frames (not yet delivered).
    func nextEpochFrames(steps: Int, full: Bool = false, live: Bool = false) throws -> [[UInt8]] {
        for _ in 0..<steps { _ = guest.step(); _ = guest.flushOutput(to: DiscardPort()) }
        try guest.capture(full: full, into: buffer)
        if live {
            // A round of the live first copy: pages only, no device state.
            buffer.deviceState = []
            buffer.isLive = true
        }
        epoch = epoch.next
        var frames: [[UInt8]] = []
        _ = encoder.encode(buffer, epoch: epoch, generation: generation, baseEpoch: lastSent) { frames.append($0) }
        lastSent = epoch
        return frames
    }

    /// Decodes frame bytes and feeds them to the replica; returns the first outcome that is
    /// not `.staged` (the verdict on the epoch), or `.staged` if the epoch is still open.
    @discardableResult
    func deliver(_ frames: [[UInt8]]) throws -> Replica.Outcome? {
        var decoder = FrameDecoder()
        var verdict: Replica.Outcome?
        for f in frames {
            decoder.feed(f)
            while let frame = try decoder.next() {
                let outcome = replica.accept(frame)
                if verdict == nil || verdict == .staged { verdict = outcome }
            }
        }
        return verdict
    }

    /// A byte-for-byte copy of the replica's memory, to prove a rejection changed nothing.
    func replicaSnapshot() -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: replica.memory.base, count: replica.memory.byteCount))
    }

    var replicaMatchesGuest: Bool { replica.memory.contentsEqual(guest.memory) }
}

struct DiscardPort: GuestOutputPort {
    func offer(_ packet: [UInt8]) -> Bool { true }
}

extension Replica.Outcome {
    var isCommitted: Bool { if case .committed = self { return true }; return false }
    var rejectReason: RejectReason? {
        switch self {
        case .rejected(_, let r, _): return r
        case .ignored(let r): return r
        default: return nil
        }
    }
}
