import Foundation
import GeminusCore
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// Checkpoints of the tiny test guest under QEMU/TCG, as the primary agent takes them, one
/// method at a time: pause (QMP stop, dirty pages, device state, cont), encode, send over an
/// authenticated loopback connection to a secondary thread that decodes, verifies and applies
/// the epoch to a replica and acknowledges it ("commit" is pause start to that ack).
public struct GuestCheckpointBench: Sendable {
    public enum Method: String, Sendable, CaseIterable {
        case compare
        case writeTracking = "write-tracking"
    }

    public struct Result: Sendable {
        public var method: Method
        public var pagesPerLoop: Int
        public var epochs = 0
        public var pause = LatencyMicros()
        public var stop = LatencyMicros()
        public var dirtyPages = LatencyMicros()
        public var deviceState = LatencyMicros()
        public var cont = LatencyMicros()
        public var encode = LatencyMicros()
        public var commit = LatencyMicros()
        /// What holding output costs a client: a packet the guest sends at a random moment of
        /// an epoch leaves when that epoch's checkpoint is applied. Derived from the measured
        /// checkpoint start and commit times, with output spread evenly over each epoch (the
        /// test guest has no NIC to send real packets).
        public var outputDelay = LatencyMicros()
        public var pagesCaptured = 0
        public var inputBytes = 0
        public var wireBytes = 0
        public var deviceStateBytes = 0
        public var epochsPerSecond = 0.0
        /// This process's CPU time over the run, as a share of one core.
        public var agentCPUPercent = 0.0
        /// The guest's own loop counter per second while checkpointed (its speed).
        public var guestLoopsPerSecond = 0.0

        public var pagesPerEpoch: Double { epochs == 0 ? 0 : Double(pagesCaptured) / Double(epochs) }
        public var compressionRatio: Double { wireBytes == 0 ? 0 : Double(inputBytes) / Double(wireBytes) }
    }

    public var kernelPath: String
    public var ramMiB: Int
    public var intervalMillis: Int
    public var epochs: Int
    /// More of the test guest's options (`walk=0`: no locality, a sweep; see Tools/guest-tiny).
    public var guestOptions: String

    public init(kernelPath: String, ramMiB: Int, intervalMillis: Int, epochs: Int, guestOptions: String = "") {
        self.kernelPath = kernelPath
        self.guestOptions = guestOptions
        self.ramMiB = ramMiB
        self.intervalMillis = intervalMillis
        self.epochs = epochs
    }

    /// One run: a fresh QEMU whose guest writes `pagesPerLoop` pages over and over (so about
    /// that many pages per epoch), checkpointed `epochs` times at the interval.
    public func run(_ method: Method, pagesPerLoop: Int) throws(GeminusError) -> Result {
        let config = QEMUGuestConfig.standard(tag: "geminus-bench-\(getpid())-\(method.rawValue)-\(pagesPerLoop)", ramMiB: ramMiB,
                                              kernelPath: kernelPath, append: "pages=\(pagesPerLoop) \(guestOptions)")
        let tracking = method == .writeTracking
        let guest = try QEMUGuest.launch(config, counterAddress: QEMUGuest.tinyGuestCounterAddress,
                                         dirtyPages: tracking ? DirtyPagePolicy(method: .tracking) : .compare,
                                         preload: tracking ? .library(try WriteTrackingPreload.require()) : .asConfigured).guest
        defer { guest.shutdown() }
        try Self.waitForBoot(guest)
        let encoder = try CheckpointEncoder(pageCount: guest.pageCount)
        let secondary = try LoopbackSecondary(pageCount: guest.pageCount)
        defer { secondary.stop() }
        let buffer = CheckpointBuffer(limitPages: guest.pageCount, initialCapacityPages: 4096)

        // The first, full checkpoint is the initial sync, not the steady state: untimed.
        try guest.pause()
        try guest.capture(full: true, into: buffer)
        try guest.resume()
        var epoch = Epoch(1)
        try secondary.commit(Self.encode(encoder, buffer, epoch, base: .none).frames, epoch: epoch, timeoutSeconds: 60)

        var r = Result(method: method, pagesPerLoop: pagesPerLoop)
        let interval = UInt64(intervalMillis) * 1_000_000
        let cpu0 = Self.cpuNanos()
        let start = Monotonic.nanos()
        let counter0 = guest.progressCounter
        var next = start + interval
        var previousPauseStart = start
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<epochs {
            let now = Monotonic.nanos()
            if next > now { Monotonic.sleep(nanos: next - now) }
            next += interval
            let t0 = Monotonic.nanos()
            try guest.pause()
            do throws(GeminusError) {
                try guest.capture(full: false, into: buffer)
            } catch {
                try? guest.resume()
                throw error
            }
            try guest.resume()
            let t1 = Monotonic.nanos()
            let base = epoch
            epoch = epoch.next
            let (frames, stats) = Self.encode(encoder, buffer, epoch, base: base)
            let t2 = Monotonic.nanos()
            try secondary.commit(frames, epoch: epoch, timeoutSeconds: 10)
            let t3 = Monotonic.nanos()
            let parts = guest.lastTimings ?? CaptureTimings()
            r.pause.record(nanos: t1 - t0)
            r.stop.record(nanos: parts.stopNanos)
            r.dirtyPages.record(nanos: parts.findCopyNanos)
            r.deviceState.record(nanos: parts.saveNanos)
            r.cont.record(nanos: parts.contNanos)
            r.encode.record(nanos: t2 - t1)
            r.commit.record(nanos: t3 - t0)
            // Output produced since the previous checkpoint belongs to this one.
            for _ in 0..<8 {
                let produced = UInt64.random(in: previousPauseStart...t0, using: &rng)
                r.outputDelay.record(nanos: t3 - produced)
            }
            previousPauseStart = t0
            r.epochs += 1
            r.pagesCaptured += stats.pages
            r.inputBytes += stats.inputBytes
            r.wireBytes += stats.wireBytes
            r.deviceStateBytes = parts.deviceStateBytes
        }
        let wall = Double(Monotonic.nanos() - start) / 1e9
        r.epochsPerSecond = Double(r.epochs) / wall
        r.agentCPUPercent = 100 * Double(Self.cpuNanos() - cpu0) / 1e9 / wall
        r.guestLoopsPerSecond = Double(guest.progressCounter &- counter0) / wall
        return r
    }

    static func waitForBoot(_ guest: QEMUGuest, timeoutSeconds: Double = 30) throws(GeminusError) {
        let deadline = Monotonic.nanos() + UInt64(timeoutSeconds * 1e9)
        while guest.progressCounter == 0 {
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.timeout, "the test guest did not start counting within \(Int(timeoutSeconds)) s",
                                   fix: "check the kernel (Tools/guest-tiny/build.sh) and QEMU's log")
            }
            Monotonic.sleep(nanos: 5_000_000)
        }
    }

    static func encode(_ e: CheckpointEncoder, _ b: CheckpointBuffer, _ epoch: Epoch, base: Epoch) -> (frames: [[UInt8]], stats: EncodeStats) {
        var frames: [[UInt8]] = []
        let s = e.encode(b, epoch: epoch, generation: Generation(1), baseEpoch: base) { frames.append($0) }
        return (frames, s)
    }

    /// User + system CPU time of this process (the secondary thread's work included).
    static func cpuNanos() -> UInt64 {
        var u = rusage()
        getrusage(RUSAGE_SELF.rawValue, &u)
        func n(_ t: timeval) -> UInt64 { UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_usec) * 1000 }
        return n(u.ru_utime) + n(u.ru_stime)
    }
}

/// The secondary's side of the benchmark on a thread of this process: receives frames over the
/// loopback link, lets the replica stage, verify and apply them, and acknowledges each commit
/// on the same link, as the secondary agent does.
final class LoopbackSecondary: @unchecked Sendable {
    private let pair: LoopbackPair
    private let replica: Replica
    private let lock = NSLock()
    private var failure: String?
    private var stopped = false
    private let finished = NSCondition()
    private var running = true

    init(pageCount: Int) throws(GeminusError) {
        pair = try LoopbackPair()
        replica = Replica(memory: try PageMemory(pageCount: pageCount))
        let t = Thread { [self] in serve() }
        t.name = "geminus-bench-secondary"
        t.start()
    }

    private func serve() {
        defer { finished.lock(); running = false; finished.broadcast(); finished.unlock() }
        while !lock.withLock({ stopped }) {
            let frame: Frame?
            do { frame = try pair.server.receive(timeout: .milliseconds(200)) } catch { return }
            guard let frame else { continue }
            switch replica.accept(frame) {
            case .committed(let e, _):
                let ack = FrameCodec.encode(FrameHeader(kind: .ack, generation: Generation(1), epoch: e))
                do { try pair.server.send(ack, timeout: .seconds(5)) } catch { return }
            case .rejected(let e, let reason, let detail):
                lock.withLock { failure = "the replica rejected benchmark epoch \(e): \(reason) \(detail)" }
            case .staged, .ignored:
                break
            }
        }
    }

    /// Sends one epoch's frames and waits for its acknowledgement.
    func commit(_ frames: [[UInt8]], epoch: Epoch, timeoutSeconds: Double) throws(GeminusError) {
        for f in frames { try pair.client.send(f, timeout: .seconds(5)) }
        let deadline = Monotonic.nanos() + UInt64(timeoutSeconds * 1e9)
        while true {
            if let why = lock.withLock({ failure }) { throw GeminusError(.internalInvariant, why) }
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.timeout, "no acknowledgement of benchmark epoch \(epoch) within \(Int(timeoutSeconds)) s")
            }
            guard let frame = try pair.client.receive(timeout: .milliseconds(100)) else { continue }
            if frame.kind == .ack && frame.epoch == epoch { return }
        }
    }

    func stop() {
        lock.withLock { stopped = true }
        // The thread notices within one receive timeout (200 ms); wait a little longer, once.
        finished.lock()
        if running { _ = finished.wait(until: Date().addingTimeInterval(1)) }
        finished.unlock()
        pair.close()
    }
}
