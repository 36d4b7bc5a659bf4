import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Finds the guest pages written since the previous call and copies them into a buffer. Called
/// only while the vCPUs are stopped. Two methods (DESIGN.md): compare against a shadow copy
/// (`ShadowCompareFinder`, here), or write tracking with userfaultfd + PAGEMAP_SCAN
/// (`WriteTrackingFinder`, checked against compare by `VerifyingFinder`).
public protocol DirtyPageFinder: AnyObject {
    /// The method's name as `geminus status` and the benchmark show it ("compare", ...).
    var methodName: String { get }
    /// Appends to `buffer` every page of `memory` written since the previous call (every page
    /// when `full`, or on the first call) and starts a new written set. Does not reset `buffer`.
    /// Throws `.resourceExhausted` when the buffer is too small; the next call is then full.
    func collect(from memory: PageMemory, full: Bool, into buffer: CheckpointBuffer) throws(GeminusError)
    /// Counters `geminus status` shows beside the method's name (resyncs, verified epochs...).
    var statusReport: [String: String] { get }
}

extension DirtyPageFinder {
    public var statusReport: [String: String] { [:] }
}

/// The "compare" method: keeps a copy of every page as last captured and reports the pages that
/// differ from it. Works on any QEMU and kernel; costs one pass over guest RAM per capture.
public final class ShadowCompareFinder: DirtyPageFinder {
    private var shadow: PageMemory?
    private var needsFull = true

    public init() {}

    public var methodName: String { "compare" }

    public func collect(from memory: PageMemory, full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        if shadow?.pageCount != memory.pageCount {
            shadow = try PageMemory(pageCount: memory.pageCount)
            needsFull = true
        }
        let shadow = shadow!
        let everything = full || needsFull
        needsFull = true  // until this call completes
        let src = memory.base
        let dst = shadow.base
        let size = GuestPage.size
        for page in 0..<memory.pageCount {
            let s = src + page * size
            let d = dst + page * size
            if everything || memcmp(s, d, size) != 0 {
                guard let out = buffer.appendPage(index: page) else {
                    throw GeminusError(.resourceExhausted,
                                       "capture buffer holds \(buffer.limitPages) pages and the guest wrote more",
                                       fix: "raise the checkpoint buffer limit or shorten the epoch")
                }
                out.copyMemory(from: s, byteCount: size)
                d.copyMemory(from: out, byteCount: size)
            }
        }
        needsFull = false
    }
}
