import Foundation
import GeminusCore
import GeminusHypervisor
import Histogram

/// The checkpoint pipeline on the simulated guest, stage by stage (capture, encode, decode and
/// apply), next to a memcpy of the same bytes measured in the same run: the physical limit on
/// this machine. For `Bench/geminus-bench` and `geminus bench`.
public struct PipelineBench: Sendable {
    public var ramMib: Int
    public var pagesPerEpoch: Int
    public var epochs: Int

    public init(ramMiB: Int, pagesPerEpoch: Int, epochs: Int) {
        self.ramMib = ramMiB
        self.pagesPerEpoch = pagesPerEpoch
        self.epochs = epochs
    }

    public struct Result: Sendable {
        public var memcpyGBps = 0.0, captureGBps = 0.0, encodeGBps = 0.0, decodeGBps = 0.0, ratio = 0.0
        public var pagesPerSecondEncode = 0.0
        public var wireBytes = 0
        public var pause = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        public var commit = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        public var json: [String: Any] {
            ["memcpyGBps": memcpyGBps, "captureGBps": captureGBps, "encodeGBps": encodeGBps, "decodeGBps": decodeGBps, "compressionRatio": ratio,
             "encodePagesPerSecond": pagesPerSecondEncode, "wireBytes": wireBytes,
             "pauseMicros": ["p50": pause.valueAtPercentile(50), "p90": pause.valueAtPercentile(90), "p99": pause.valueAtPercentile(99), "max": pause.max],
             "commitMicros": ["p50": commit.valueAtPercentile(50), "p90": commit.valueAtPercentile(90), "p99": commit.valueAtPercentile(99), "max": commit.max]]
        }
    }

    public func measure(_ kind: PageContent) throws(GeminusError) -> Result {
        let workload = SimulatedWorkload(ramMiB: ramMib, dirtyPagesPerSecond: 100_000, hotFraction: 0.25, content: kind, outputsPerSecond: 0, seed: 11)
        let guest = try SimulatedGuest(workload: workload, memory: PageMemory(pageCount: workload.pageCount))
        let encoder = try CheckpointEncoder(pageCount: workload.pageCount)
        let replica = Replica(memory: try PageMemory(pageCount: workload.pageCount))
        let buffer = CheckpointBuffer(limitPages: workload.pageCount)
        // The full first checkpoint is not what the steady state costs; it is done untimed.
        try guest.capture(full: true, into: buffer)
        var epoch = Epoch(1)
        try Self.deliver(GuestCheckpointBench.encode(encoder, buffer, epoch, base: .none).frames, to: replica)
        var r = Result()
        let copyTarget = UnsafeMutableRawPointer.allocate(byteCount: workload.pageCount * GuestPage.size, alignment: GuestPage.size)
        defer { copyTarget.deallocate() }
        var memcpyNanos: UInt64 = 0
        var captureNanos: UInt64 = 0, encodeNanos: UInt64 = 0, decodeNanos: UInt64 = 0
        var inputBytes = 0, pages = 0
        for _ in 0..<epochs {
            // Between checkpoints the guest writes; that is the guest's time, not ours.
            for _ in 0..<pagesPerEpoch { guest.step() }
            let t0 = Monotonic.nanos()
            try guest.capture(full: false, into: buffer)
            let t1 = Monotonic.nanos()
            // Baseline: the same pages, same cache state, copied with nothing but memcpy.
            let m0 = Monotonic.nanos()
            for (i, p) in buffer.pageIndices.enumerated() {
                (copyTarget + i * GuestPage.size).copyMemory(from: guest.memory.page(p), byteCount: GuestPage.size)
            }
            memcpyNanos += Monotonic.nanos() - m0
            let base = epoch
            epoch = epoch.next
            let (frames, stats) = GuestCheckpointBench.encode(encoder, buffer, epoch, base: base)
            let t2 = Monotonic.nanos()
            try Self.deliver(frames, to: replica)
            let t3 = Monotonic.nanos()
            guard replica.committedEpoch == epoch else { throw GeminusError(.internalInvariant, "benchmark epoch \(epoch) was not committed") }
            captureNanos += t1 - t0
            encodeNanos += t2 - t1
            decodeNanos += t3 - t2
            _ = r.pause.record((t1 - t0) / 1000)
            _ = r.commit.record((t3 - t0) / 1000)
            inputBytes += stats.inputBytes
            r.wireBytes += stats.wireBytes
            pages += stats.pages
        }
        guard replica.memory.contentsEqual(guest.memory) else { throw GeminusError(.internalInvariant, "the replica diverged from the guest") }
        r.memcpyGBps = Double(pages * GuestPage.size) / Double(memcpyNanos)
        r.captureGBps = Double(inputBytes) / Double(captureNanos)
        r.encodeGBps = Double(inputBytes) / Double(encodeNanos)
        r.decodeGBps = Double(inputBytes) / Double(decodeNanos)
        r.ratio = Double(inputBytes) / Double(r.wireBytes)
        r.pagesPerSecondEncode = Double(pages) / (Double(encodeNanos) / 1e9)
        return r
    }

    /// Decodes the frames and hands them to the replica, as the secondary does (no network).
    static func deliver(_ frames: [[UInt8]], to replica: Replica) throws(GeminusError) {
        var d = FrameDecoder()
        for f in frames {
            d.feed(f)
            while true {
                let next: Frame?
                do { next = try d.next() } catch { throw GeminusError(.internalInvariant, "benchmark frames do not decode: \(error)") }
                guard let frame = next else { break }
                if case .rejected(_, let reason, let detail) = replica.accept(frame) {
                    throw GeminusError(.internalInvariant, "the replica rejected a benchmark epoch: \(reason) \(detail)")
                }
            }
        }
    }
}
