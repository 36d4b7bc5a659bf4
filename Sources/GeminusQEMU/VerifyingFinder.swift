import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// What `VerifyingFinder` found so far. `missedPages` must stay 0: any other value means the
/// tracked method lost writes and must not be trusted for this VM.
public struct TrackingVerification: Sendable, Equatable {
    /// Delta epochs checked against the full comparison.
    public var epochs = 0
    /// Epochs where the tracked finder copied every page (nothing to check).
    public var fullEpochs = 0
    /// Pages the tracked finder reported over the checked epochs.
    public var reportedPages = 0
    /// Pages whose contents the comparison found changed over the checked epochs.
    public var changedPages = 0
    /// Changed pages the tracked finder did not report: lost writes.
    public var missedPages = 0
    /// Checked epochs with at least one miss.
    public var epochsWithMisses = 0
    /// Reported pages whose contents had not changed (a write of the same bytes): harmless.
    public var unchangedReported = 0
    /// Pages the tracked finder put into one epoch more than once (wasteful, not wrong).
    public var duplicatePages = 0
    /// Up to 16 missed page numbers of the last epoch with misses.
    public var lastMissed: [Int] = []

    public init() {}
}

/// The diagnostic mode (`--verify-tracking`): runs a tracked finder (write tracking) and checks
/// each of its epochs against a full comparison with a shadow copy of guest RAM. A page the
/// comparison finds changed that the tracked finder did not report is a miss: it is added to
/// the buffer (so this checkpoint is still right) and `collect` throws `.internalInvariant`
/// with the counts, so the caller sees it. The next epoch is then a full copy.
///
/// Costs the comparison's O(guest RAM) per epoch plus a second copy of guest RAM, and reading
/// every page through the agent's mapping allocates the RAM file's holes (tmpfs): a test and
/// operator diagnostic, not the production path.
public final class VerifyingFinder: DirtyPageFinder {
    public let tracking: any DirtyPageFinder
    public private(set) var verification = TrackingVerification()
    private var shadow: PageMemory?
    private var shadowValid = false
    private var forceFull = false
    private var reported: DirtyPageSet?

    /// When set, a miss is reported here instead of thrown: the agent keeps protecting the VM
    /// (the missed pages are in this checkpoint, the next one is full) and says so loudly,
    /// where a thrown error would end the checkpoint before the device state is saved.
    public let onMiss: (@Sendable (TrackingVerification, String) -> Void)?

    public init(tracking: any DirtyPageFinder, onMiss: (@Sendable (TrackingVerification, String) -> Void)? = nil) {
        self.tracking = tracking
        self.onMiss = onMiss
    }

    public var methodName: String { "\(tracking.methodName), verified by compare" }
    public var statusReport: [String: String] {
        tracking.statusReport.merging(["verifiedEpochs": "\(verification.epochs)", "missedPages": "\(verification.missedPages)",
                                       "epochsWithMisses": "\(verification.epochsWithMisses)"]) { _, new in new }
    }

    public func collect(from memory: PageMemory, full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        if shadow?.pageCount != memory.pageCount {
            shadow = try PageMemory(pageCount: memory.pageCount)
            reported = DirtyPageSet(pageCount: memory.pageCount)
            shadowValid = false
        }
        let shadow = shadow!
        let first = buffer.pageCount
        let askFull = full || forceFull
        forceFull = false
        do throws(GeminusError) {
            try tracking.collect(from: memory, full: askFull, into: buffer)
        } catch {
            shadowValid = false
            throw error
        }
        let count = buffer.pageCount - first
        if askFull || count == memory.pageCount || !shadowValid {
            // A full copy (asked for, or the tracked finder's own resync): nothing can be
            // missing; it only refreshes the reference.
            memcpy(shadow.base, memory.base, memory.byteCount)
            shadowValid = true
            verification.fullEpochs += 1
            return
        }
        var set = reported!
        set.removeAll()
        for i in first..<buffer.pageCount {
            let page = buffer.pageIndices[i]
            if set.contains(page) { verification.duplicatePages += 1 }
            set.insert(page)
        }
        var changed = 0, changedReported = 0
        var missed: [Int] = []
        let size = GuestPage.size
        for page in 0..<memory.pageCount {
            let s = memory.base + page * size
            let d = shadow.base + page * size
            guard memcmp(s, d, size) != 0 else { continue }
            changed += 1
            if set.contains(page) { changedReported += 1 } else { missed.append(page) }
            d.copyMemory(from: s, byteCount: size)
        }
        reported = set
        verification.epochs += 1
        verification.reportedPages += count
        verification.changedPages += changed
        verification.unchangedReported += set.count - changedReported
        guard missed.isEmpty else {
            verification.missedPages += missed.count
            verification.epochsWithMisses += 1
            verification.lastMissed = Array(missed.prefix(16))
            forceFull = true
            for page in missed {
                guard buffer.appendPage(index: page, copying: memory.page(page)) else { break }
            }
            let message = "write tracking missed \(missed.count) of \(changed) changed pages in this epoch (pages \(verification.lastMissed.map(String.init).joined(separator: ", "))\(missed.count > 16 ? ", …" : "")); \(verification.missedPages) missed in \(verification.epochsWithMisses) of \(verification.epochs) verified epochs"
            if let onMiss {
                onMiss(verification, message)
                return
            }
            throw GeminusError(.internalInvariant,
                               "write tracking missed \(missed.count) of \(changed) changed pages in this epoch (pages \(verification.lastMissed.map(String.init).joined(separator: ", "))\(missed.count > 16 ? ", …" : "")); \(verification.missedPages) missed in \(verification.epochsWithMisses) of \(verification.epochs) verified epochs",
                               fix: "protect this VM with the compare method (ShadowCompareFinder) and report it; known causes: memory discarded by a balloon or virtio-mem, a device or process writing guest RAM outside QEMU's mapping")
        }
    }
}
