/// The primary's output-commit buffer (promise S2, the Remus rule): everything the guest sends
/// is tagged with the epoch whose checkpoint will contain the state that produced it, and
/// leaves only once the secondary has acknowledged that epoch. A client therefore never sees
/// output from a state the secondary could not resume.
///
/// Bounded in bytes. When full, `append` refuses: the caller must stall the producer (slow the
/// guest), never drop the item and never release it early. Each refusal is counted.
public struct OutputQueue<Item: Sendable>: Sendable {
    public enum Mode: Sendable, Equatable {
        /// A secondary is protecting the VM: hold until acknowledged.
        case holding
        /// No secondary: items pass straight through (the VM is unprotected and says so).
        case passThrough
    }

    public enum AppendOutcome: Equatable, Sendable {
        case held
        /// Unprotected: the caller sends it now.
        case releaseNow
        /// Over the byte limit: stall the producer and retry after a release.
        case full
    }

    private struct Entry: Sendable {
        var epoch: Epoch
        var bytes: Int
        var item: Item
    }

    public let limitBytes: Int
    public private(set) var mode: Mode
    /// Items appended now belong to this epoch.
    public private(set) var openEpoch: Epoch
    public private(set) var heldBytes = 0
    public private(set) var releasedCount = 0
    public private(set) var fullRefusals = 0
    /// Set by `fence()`: nothing is taken, held or released any more.
    public private(set) var isFenced = false
    private var entries: [Entry] = []
    private var head = 0

    public init(limitBytes: Int, mode: Mode = .passThrough, openEpoch: Epoch = Epoch(1)) {
        precondition(limitBytes > 0)
        self.limitBytes = limitBytes
        self.mode = mode
        self.openEpoch = openEpoch
    }

    public var heldCount: Int { entries.count - head }
    /// The epoch of the oldest held item, for the commit-lag report.
    public var oldestHeldEpoch: Epoch? { head < entries.count ? entries[head].epoch : nil }

    /// Starts tagging new items with `epoch`. Called while the guest is paused for the
    /// checkpoint of `epoch - 1`, so nothing produced after that checkpoint is tagged with it.
    public mutating func open(epoch: Epoch) {
        precondition(epoch > openEpoch, "output epochs only grow")
        openEpoch = epoch
    }

    public mutating func append(_ item: Item, bytes: Int) -> AppendOutcome {
        // A fenced queue stalls the producer for good (not counted: it is no full buffer).
        guard !isFenced else { return .full }
        switch mode {
        case .passThrough:
            releasedCount += 1
            return .releaseNow
        case .holding:
            // One item may always be held, so an item larger than the limit cannot wedge it.
            guard heldBytes + bytes <= limitBytes || heldCount == 0 else {
                fullRefusals += 1
                return .full
            }
            entries.append(Entry(epoch: openEpoch, bytes: bytes, item: item))
            heldBytes += bytes
            return .held
        }
    }

    /// Everything produced in epochs up to and including `epoch`, in production order.
    public mutating func release(through epoch: Epoch) -> [Item] {
        guard !isFenced else { return [] }
        var out: [Item] = []
        while head < entries.count, entries[head].epoch <= epoch {
            out.append(entries[head].item)
            heldBytes -= entries[head].bytes
            head += 1
        }
        releasedCount += out.count
        compact()
        return out
    }

    /// Switches mode. Leaving `holding` releases everything held: only the primary's
    /// protection logic may decide that (it knows no secondary can resume an older state).
    public mutating func setMode(_ newMode: Mode) -> [Item] {
        mode = newMode
        guard newMode == .passThrough, !isFenced else { return [] }
        let out = entries[head...].map(\.item)
        releasedCount += out.count
        entries.removeAll(keepingCapacity: true)
        head = 0
        heldBytes = 0
        return out
    }

    /// A self-fenced primary: drops everything held without releasing it (what it held must
    /// never reach a client, the secondary runs the VM from an older state) and refuses all
    /// output from now on, whatever its caller still asks. Returns how many items were dropped.
    @discardableResult
    public mutating func fence() -> Int {
        let n = heldCount
        isFenced = true
        entries.removeAll(keepingCapacity: false)
        head = 0
        heldBytes = 0
        return n
    }

    private mutating func compact() {
        if head > 1024 && head * 2 > entries.count {
            entries.removeFirst(head)
            head = 0
        } else if head == entries.count {
            entries.removeAll(keepingCapacity: true)
            head = 0
        }
    }
}
