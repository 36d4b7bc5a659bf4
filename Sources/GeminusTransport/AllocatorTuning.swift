#if canImport(Glibc)
import Glibc
#endif

/// Keeps glibc malloc from returning frame-sized memory to the kernel after every frame.
///
/// Frame arrays (up to 4 MiB) are allocated on one thread and freed on another. With glibc's
/// defaults such blocks are mmap'd, or the arena top is trimmed as soon as 2x the largest
/// freed block is free; either way the next frame's pages are faulted in and zeroed again.
/// On loopback that was ~900k page faults in 4 s and half the throughput, depending on
/// nothing more than allocation timing. This is a process-wide setting: an agent that
/// prefers to own it can call `apply()` itself at startup (it runs once).
enum AllocatorTuning {
    // <malloc.h>; not exported by Swift's Glibc module.
    private static let trimThresholdParam: Int32 = -1
    private static let mmapThresholdParam: Int32 = -3
    /// Above the 4 MiB frame limit, so no frame is ever mmap'd.
    static let mmapThresholdBytes: Int32 = 8 << 20
    /// Two full 64 MiB queues' worth of freed memory may stay in the heap.
    static let trimThresholdBytes: Int32 = 128 << 20

    private static let applied: Bool = {
        typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return false }
        let mallopt = unsafeBitCast(symbol, to: Mallopt.self)
        return mallopt(mmapThresholdParam, mmapThresholdBytes) == 1 && mallopt(trimThresholdParam, trimThresholdBytes) == 1
    }()

    /// Idempotent and thread-safe (a Swift global initialiser runs once).
    @discardableResult
    static func apply() -> Bool { applied }
}
