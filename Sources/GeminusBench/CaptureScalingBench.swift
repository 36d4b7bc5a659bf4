import Foundation
import GeminusCore
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// How the dirty-page part of the pause grows with guest RAM and with pages written, for each
/// method, on guest-sized memory in this process (TCG cannot run multi-GiB guests usefully):
/// a tmpfs file mapped shared, as QEMU maps guest RAM, written by this process and tracked
/// through its own userfaultfd (`WriteTrackingFinder.trackingThisProcess`), or compared.
public struct CaptureScalingBench: Sendable {
    public struct Point: Sendable {
        public var method: GuestCheckpointBench.Method
        public var ramMiB: Int
        public var pagesWritten: Int
        /// Median collect time (find + copy), microseconds.
        public var collectMicros: UInt64
    }

    public var sizesMiB: [Int]
    public var pagesWritten: [Int]
    public var repetitions: Int

    public init(sizesMiB: [Int], pagesWritten: [Int], repetitions: Int) {
        self.sizesMiB = sizesMiB
        self.pagesWritten = pagesWritten
        self.repetitions = repetitions
    }

    /// Memory a size needs here: the file, a full-copy buffer and the compare's shadow.
    public static func bytesNeeded(ramMiB: Int) -> Int { 3 * ramMiB << 20 }

    public func run(ramMiB: Int, progress: (String) -> Void) throws(GeminusError) -> [Point] {
        let pages = ramMiB * 256
        let path = "/dev/shm/geminus-bench-scale-\(getpid()).ram"
        unlink(path)
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw GeminusError(.io, "cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { unlink(path) }
        let r = posix_fallocate(fd, 0, off_t(pages * GuestPage.size))
        close(fd)
        guard r == 0 else {
            throw GeminusError(.resourceExhausted, "cannot allocate \(ramMiB) MiB on /dev/shm: \(String(cString: strerror(r)))",
                               fix: "free /dev/shm or pass smaller --scaling-sizes")
        }
        let memory = try PageMemory(fileAt: path, pageCount: pages, create: false)
        // A guest that has touched all its RAM: no page is a hole.
        for p in 0..<pages { memory.page(p).storeBytes(of: UInt64(p), as: UInt64.self) }
        var points: [Point] = []
        var rng = SystemRandomNumberGenerator()
        var stamp: UInt64 = 1
        for method in GuestCheckpointBench.Method.allCases {
            progress("scaling: \(ramMiB) MiB, \(method.rawValue)")
            let finder: any DirtyPageFinder = method == .compare
                ? ShadowCompareFinder() : try WriteTrackingFinder.trackingThisProcess(ramFilePath: path)
            do {
                let full = CheckpointBuffer(limitPages: pages, initialCapacityPages: pages)
                try finder.collect(from: memory, full: true, into: full)
            }
            let small = CheckpointBuffer(limitPages: (pagesWritten.max() ?? 0) + 16, initialCapacityPages: (pagesWritten.max() ?? 0) + 16)
            for written in pagesWritten {
                var samples: [UInt64] = []
                for _ in 0..<repetitions {
                    // Distinct pages, scattered: the worst case for both methods' copy.
                    let stride = max(1, pages / max(written, 1))
                    let offset = Int.random(in: 0..<stride, using: &rng)
                    stamp &+= 1
                    for i in 0..<written { memory.page((offset + i * stride) % pages).storeBytes(of: stamp, as: UInt64.self) }
                    small.reset()
                    let t0 = Monotonic.nanos()
                    try finder.collect(from: memory, full: false, into: small)
                    samples.append(Monotonic.nanos() - t0)
                }
                points.append(Point(method: method, ramMiB: ramMiB, pagesWritten: written, collectMicros: median(samples) / 1000))
            }
        }
        return points
    }
}
