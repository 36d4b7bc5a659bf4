import Foundation
import GeminusCore

/// A simulated guest running in real time on its own thread (its "vCPU"), paced to the
/// workload's dirty rate, behind the same seam the libvirt/QEMU domain implements.
public final class SimulatedVM: ProtectedGuest, @unchecked Sendable {
    public let guest: SimulatedGuest
    private let output: any GuestOutputPort
    private let lock = NSCondition()
    private var pauseRequested = false
    private var isParked = false
    private var stopRequested = false
    private var thread: Thread?
    /// Guest time advances only while running, as a real vCPU's does.
    private var runningNanos: UInt64 = 0
    private var stepsDone: UInt64 = 0
    /// Time the vCPU spent unable to run because the output buffer was full.
    public private(set) var outputStallNanos: UInt64 = 0

    public var pageCount: Int { guest.memory.pageCount }
    public var progressCounter: UInt64 { guest.memory.loadU64(at: SimulatedGuest.counterAddress) }
    public var statusReport: [String: String] { ["guest": "simulated"] }
    /// For a guest resumed from a checkpoint: the output history that checkpoint stands behind,
    /// read before the guest ran on (the demo checks the resumed guest against it).
    public var resumedHistory: TestGuestHistory?

    public var takeoverFacts: [String: JSONValue] {
        guard let h = resumedHistory else { return [:] }
        return ["outputSequence": .int(h.outputSequence),
                "recentOutputs": .array(h.recent.map { .array([.int($0.sequence), .int($0.counter)]) }),
                "pendingOutput": h.pendingSequence.map { .int($0) } ?? .null,
                "seed": .int(guest.workload.seed)]
    }

    /// Boots a new simulated guest (paused until `start`).
    public convenience init(workload: SimulatedWorkload, output: any GuestOutputPort) throws(GeminusError) {
        let memory = try PageMemory(pageCount: workload.pageCount)
        try self.init(guest: SimulatedGuest(workload: workload, memory: memory), output: output)
    }

    public init(guest: SimulatedGuest, output: any GuestOutputPort) throws(GeminusError) {
        self.guest = guest
        self.output = output
    }

    public func start() {
        lock.lock()
        defer { lock.unlock() }
        precondition(thread == nil, "started twice")
        let t = Thread { [self] in runLoop() }
        t.name = "geminus-vcpu"
        thread = t
        t.start()
    }

    public func pause() throws(GeminusError) {
        lock.lock()
        defer { lock.unlock() }
        pauseRequested = true
        while !isParked && !stopRequested && thread != nil { lock.wait() }
    }

    public func resume() throws(GeminusError) {
        lock.lock()
        pauseRequested = false
        lock.broadcast()
        lock.unlock()
    }

    public func capture(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        lock.lock()
        let parked = isParked || thread == nil
        lock.unlock()
        precondition(parked, "capture while the vCPU runs would copy torn pages")
        try guest.capture(full: full, into: buffer)
    }

    /// Its loop runs no step after the request, and its output port is fenced by then.
    public var stoppedForGood: Bool {
        lock.lock()
        defer { lock.unlock() }
        return stopRequested
    }

    public func shutdown() {
        lock.lock()
        stopRequested = true
        lock.broadcast()
        lock.unlock()
    }

    private func runLoop() {
        let rate = UInt64(guest.workload.dirtyPagesPerSecond)
        var sliceStart = Monotonic.nanos()
        while true {
            lock.lock()
            if pauseRequested || stopRequested {
                runningNanos += Monotonic.nanos() - sliceStart
                isParked = true
                lock.broadcast()
                while pauseRequested && !stopRequested { lock.wait() }
                isParked = false
                if stopRequested { lock.unlock(); return }
                sliceStart = Monotonic.nanos()
            }
            lock.unlock()
            // Steps due by now at the configured rate; catch up in small batches so a pause
            // request waits at most one batch.
            let now = Monotonic.nanos()
            let due = (runningNanos + now - sliceStart) * rate / 1_000_000_000
            if stepsDone >= due {
                Monotonic.sleep(nanos: 200_000)
                continue
            }
            for _ in 0..<min(due - stepsDone, 64) {
                if !guest.flushOutput(to: output) {
                    let stallStart = Monotonic.nanos()
                    Monotonic.sleep(nanos: 100_000)
                    outputStallNanos += Monotonic.nanos() - stallStart
                    break
                }
                guest.step()
                stepsDone += 1
            }
        }
    }
}

/// The secondary side of the simulated hypervisor: replica memory is anonymous memory, and
/// failover resumes a `SimulatedVM` on it.
public struct SimulatedStandbyHost: StandbyHost {
    public init() {}

    public func makeReplicaMemory(pageCount: Int) throws(GeminusError) -> PageMemory {
        try PageMemory(pageCount: pageCount)
    }

    public func checkHealth() -> [String: String] { ["guest": "simulated", "standby": "ready"] }

    public func resume(memory: PageMemory, deviceState: [UInt8], output: any GuestOutputPort) throws(GeminusError) -> any ProtectedGuest {
        let history = TestGuestHistory(memory: memory, deviceState: deviceState)
        let vm = try SimulatedVM(guest: SimulatedGuest(memory: memory, deviceState: deviceState), output: output)
        vm.resumedHistory = history
        vm.start()
        return vm
    }
}
