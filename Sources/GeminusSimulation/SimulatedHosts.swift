import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication

/// A host of the simulated world: alive until it crashes, and the link its node holds.
class SimHost {
    var isAlive = true
    var link: WorldLink?
    var frozenUntilNanos: UInt64?
    /// What the host did while frozen: it reaches the world when the host thaws.
    var deferred: [(PairSimulator) -> Void] = []
    var armedCrash: CrashPoint?
    var isFrozen: Bool { frozenUntilNanos != nil }
}

/// The primary's host: the real `PrimaryNode` over a simulated guest, dialer, lease and link.
final class SimPrimaryHost: SimHost {
    var node: PrimaryNode?
    var guest: SteppedGuest!
    var dialer: WorldDialer!
    var lease: WorldLease?
    var witnessLink: WorldWitnessLink?
    var armedFreezeNanos: UInt64?
    /// What the guest looked like at its last capture (the node says the epoch right after).
    var lastCapture: CapturedState?
    var peakSendQueueBytes = 0
    var guestStalls = 0
    var generation: Generation { node?.generation ?? Generation(1) }
}

/// The secondary's host: the real `SecondaryNode` over a simulated standby, acceptor and link;
/// after a takeover, a `PrimaryNode` running the resumed guest unprotected.
final class SimSecondaryHost: SimHost {
    var node: SecondaryNode!
    var acceptor: WorldAcceptor!
    var witnessLink: WorldWitnessLink?
    let incarnation: Int
    var commitsThisIncarnation = 0
    /// A read that overdrew the step's budget (a large frame): paid off in the next steps.
    var readDebtBytes = 0
    var resumedNode: PrimaryNode?
    var resumed: SteppedGuest?
    var resumedFrom: Epoch = .none
    /// Its apply loop hangs (a replica disk on hung storage): nothing is read or applied, but
    /// its link thread goes on sending heartbeats.
    var applyHung = false
    var replica: Replica? { node.replica }
    /// The replica's disk (nil for a guest without one).
    var replicaDisk: MemoryReplicaDisk? { replica?.disk as? MemoryReplicaDisk }

    init(incarnation: Int) { self.incarnation = incarnation }
}

/// The secondary host's standby: replica memory is anonymous memory, the replica disk a
/// `MemoryReplicaDisk`; a takeover resumes a simulated guest on copies of both, so the replica
/// stays as committed for the checks.
final class WorldStandby: StandbyHost, @unchecked Sendable {
    unowned let world: PairSimulator
    weak var host: SimSecondaryHost?
    let diskBlocks: Int
    /// The replica disk this standby made (the node makes one with its replica).
    private(set) var disk: MemoryReplicaDisk?

    init(world: PairSimulator, diskBlocks: Int) {
        self.world = world
        self.diskBlocks = diskBlocks
    }

    func makeReplicaMemory(pageCount: Int) throws(GeminusError) -> PageMemory { try PageMemory(pageCount: pageCount) }

    func makeReplicaDisk() throws(GeminusError) -> (any ReplicaDisk)? {
        guard diskBlocks > 0 else { return nil }
        let d = MemoryReplicaDisk(sizeBytes: UInt64(diskBlocks * SimulatedGuest.diskBlockSize))
        disk = d
        return d
    }

    func resume(memory: PageMemory, deviceState: [UInt8], output: any GuestOutputPort) throws(GeminusError) -> any ProtectedGuest {
        let copy = try PageMemory(pageCount: memory.pageCount)
        copy.base.copyMemory(from: memory.base, byteCount: copy.byteCount)
        let guest = try SimulatedGuest(memory: copy, deviceState: deviceState, disk: disk?.bytes)
        return SteppedGuest(guest: guest, port: output, world: world)
    }
}

/// The secondary's replica disk, in memory: what `Replica` writes at commits.
final class MemoryReplicaDisk: ReplicaDisk {
    let sizeBytes: UInt64
    var bytes: [UInt8]
    private(set) var writes = 0

    init(sizeBytes: UInt64) {
        self.sizeBytes = sizeBytes
        bytes = Array(repeating: 0, count: Int(sizeBytes))
    }

    func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
        guard offset + UInt64(data.count) <= sizeBytes else {
            throw GeminusError(.invalidArgument, "a disk write at \(offset)+\(data.count) is beyond the \(sizeBytes)-byte disk")
        }
        bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
        writes += 1
    }

    func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
        guard offset <= sizeBytes, length <= sizeBytes - offset else {
            throw GeminusError(.invalidArgument, "a disk zero write at \(offset)+\(length) is beyond the \(sizeBytes)-byte disk")
        }
        bytes.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
        writes += 1
    }

    func zeroAll() throws(GeminusError) {
        bytes = Array(repeating: 0, count: Int(sizeBytes))
    }

    func sync() throws(GeminusError) {}
}

/// A node's events become trace lines (notable from `.notice` up); a few feed the run's counts
/// and checks. A dead host's node says nothing more.
final class WorldEvents: NodeEventSink {
    unowned let world: PairSimulator
    unowned let host: SimHost
    let name: String

    init(world: PairSimulator, host: SimHost, name: String) {
        self.world = world
        self.host = host
        self.name = name
    }

    func record(_ event: NodeEvent) {
        guard host.isAlive else { return }
        switch event {
        case .captured(let e, let full, _, _, _, _), .liveCopied(let e, let full, _, _, _):
            if let p = host as? SimPrimaryHost, let cap = p.lastCapture { world.captured[e] = cap }
            if full { world.fullCheckpoints += 1 }
        case .finalCaptured(let e, _, _):
            // A planned switchover's last checkpoint, which the secondary resumes.
            if let p = host as? SimPrimaryHost, let cap = p.lastCapture { world.captured[e] = cap }
        case .liveCommitted(let e, _, let full):
            if let s = host as? SimSecondaryHost {
                world.epochsCommitted += 1
                s.commitsThisIncarnation += 1
                world.checkCommit(e, isFull: full, s)
            }
        case .resyncing: world.resyncs += 1
        case .epochDeferred(_, let count):
            world.deferredEpochs += 1
            // The first one tells the story; the rest are counted.
            world.note(name, event.message, notable: count == 1)
            return
        case .committed(let e, _, let full):
            if let s = host as? SimSecondaryHost {
                world.epochsCommitted += 1
                s.commitsThisIncarnation += 1
                world.checkCommit(e, isFull: full, s)
            }
        case .cannotTakeOver:
            // Reported: the VM is down and says so (L1 allows that, never silence).
            world.cannotTakeOverReported = true
        case .selfFenced:
            world.selfFences += 1
        default:
            break
        }
        world.note(name, event.message, notable: event.level >= .notice)
    }
}
