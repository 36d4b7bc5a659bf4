import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// Where the time of one checkpoint pause went (nanoseconds).
public struct CaptureTimings: Sendable, Equatable {
    /// QMP `stop` round trip.
    public var stopNanos: UInt64 = 0
    /// Finding the dirty pages and copying them into the buffer.
    public var findCopyNanos: UInt64 = 0
    /// `xen-save-devices-state` round trip plus reading the file.
    public var saveNanos: UInt64 = 0
    /// QMP `cont` round trip.
    public var contNanos: UInt64 = 0
    public var pages: Int = 0
    public var deviceStateBytes: Int = 0

    public init() {}
    /// From the `stop` command to the `cont` reply (what the guest feels).
    public var pauseNanos: UInt64 { stopNanos + findCopyNanos + saveNanos + contNanos }
}

/// A QEMU guest with its RAM in a shared file, driven over QMP: the real `ProtectedGuest`.
public final class QEMUGuest: ProtectedGuest, @unchecked Sendable {
    public let process: QEMUProcess
    public let qmp: QMPClient
    /// The guest's RAM, mapped from its RAM file.
    public let memory: PageMemory
    /// Guest-physical address of the guest's progress counter (u64).
    public let counterAddress: Int
    /// Where QEMU writes the device state at each capture.
    public let deviceStatePath: String
    /// Whether `shutdown` deletes the RAM file.
    public let ownsRAMFile: Bool

    /// The shared stop → capture → cont cycle.
    public let checkpointer: QMPCheckpointer
    private let lock = NSLock()
    private var isShutDown = false
    private var lastAnnounceNanos: UInt64 = 0
    /// The serial console as output (QEMU started with `serialSocketPath`), else nil.
    public private(set) var serial: SerialOutput?
    /// The NIC's frames (QEMU started with `nic`), else nil.
    public let nic: GuestNIC?
    /// The replicated disk (QEMU started with `disk`), else nil.
    public let disk: ReplicatedDisk?

    public static let tinyGuestCounterAddress = 0x200008

    public var pageCount: Int { memory.pageCount }
    public var progressCounter: UInt64 { memory.loadU64(at: counterAddress) }
    public var lastCaptureParts: CaptureParts? { checkpointer.lastCaptureParts }
    /// Chooses the dirty-page method once QEMU runs (write tracking needs its pid); before the
    /// first capture, which is full.
    public func useFinder(_ finder: any DirtyPageFinder) { checkpointer.useFinder(finder) }
    public var statusReport: [String: String] {
        var r = checkpointer.dirtyPageReport.merging(["guest": "qemu"]) { _, new in new }
        if let nic {
            let input = nic.framesIn
            r["nic"] = "\(nic.setup.mac) frames out \(nic.framesOut), in \(input.delivered), in dropped \(input.dropped)\(nic.waitingCapHits > 0 ? ", reading stopped \(nic.waitingCapHits) times at the \(GuestNIC.maxWaitingBytes >> 20) MiB cap" : "")\(nic.isStalled ? ", STALLED on a full output buffer" : "")"
        }
        if let disk {
            r["disk"] = "\(disk.setup.sizeBytes >> 20) MiB, mirror \(disk.export.isConnected ? "connected" : disk.export.lost.map { "LOST (\($0))" } ?? "not started"), \(disk.export.writesReceived) writes"
        }
        return r
    }
    /// The timings of the last complete pause → capture → resume cycle.
    public var lastTimings: CaptureTimings? { checkpointer.lastTimings }

    /// Wraps a running QEMU (its QMP already connected, its RAM file mapped).
    public init(process: QEMUProcess, qmp: QMPClient, memory: PageMemory,
                counterAddress: Int = QEMUGuest.tinyGuestCounterAddress,
                finder: any DirtyPageFinder = ShadowCompareFinder(), ownsRAMFile: Bool = true, serial: SerialOutput? = nil,
                nic: GuestNIC? = nil, disk: ReplicatedDisk? = nil) {
        self.serial = serial
        self.nic = nic
        self.disk = disk
        self.process = process
        self.qmp = qmp
        self.memory = memory
        self.counterAddress = counterAddress
        self.ownsRAMFile = ownsRAMFile
        deviceStatePath = process.config.ramFilePath + ".devstate"
        checkpointer = QMPCheckpointer(qmp: qmp, memory: memory, target: .file(deviceStatePath), finder: finder)
    }

    /// Starts a fresh guest: deletes a stale RAM file, starts QEMU, connects QMP and maps RAM.
    public static func launch(_ config: QEMUGuestConfig, counterAddress: Int = QEMUGuest.tinyGuestCounterAddress,
                              finder: any DirtyPageFinder = ShadowCompareFinder()) throws(GeminusError) -> QEMUGuest {
        precondition(!config.incomingDefer, "launch a standby through QEMUStandby")
        unlink(config.ramFilePath)
        // The NIC's socket and the disk's export listen before QEMU starts and connects.
        var nic: GuestNIC?
        var disk: ReplicatedDisk?
        let process: QEMUProcess
        do throws(GeminusError) {
            nic = try config.nic.map { n throws(GeminusError) in try GuestNIC(n) }
            if let d = config.disk {
                try ReplicatedDisk.createEmpty(d)
                disk = try ReplicatedDisk(d)
            }
            process = try QEMULauncher.start(config)
        } catch {
            nic?.stop()
            disk?.stop()
            throw error
        }
        do throws(GeminusError) {
            let qmp = try connectQMP(process)
            // QEMU creates and sizes the RAM file before it opens the QMP socket.
            let memory = try PageMemory(fileAt: config.ramFilePath, pageCount: config.pageCount, create: false)
            let serial = try config.serialSocketPath.map { path throws(GeminusError) in try SerialOutput(socketPath: path) }
            return QEMUGuest(process: process, qmp: qmp, memory: memory, counterAddress: counterAddress, finder: finder, serial: serial, nic: nic, disk: disk)
        } catch {
            nic?.stop()
            disk?.stop()
            process.cleanup(removeRAMFile: true)
            throw error
        }
    }

    static func connectQMP(_ process: QEMUProcess, timeout: Double = 10) throws(GeminusError) -> QMPClient {
        do throws(GeminusError) {
            return try QMPClient(socketPath: process.config.qmpSocketPath, connectTimeout: timeout)
        } catch {
            var e = error
            if !process.isRunning { e.message = "QEMU (pid \(process.pid)) exited at start: \(process.stderrTail())" }
            throw e
        }
    }

    /// Pauses, then takes the console lines and NIC frames produced before the pause (`drain`),
    /// so that they belong to the epoch being captured.
    public func pause() throws(GeminusError) {
        try checkpointer.pause()
        drainOutput()
    }

    public func drainOutput() {
        serial?.drain()
        nic?.drain()
    }

    /// Console lines and NIC frames go to `port` from now on (with `serialSocketPath` and `nic`;
    /// otherwise nothing to send).
    public func attachOutput(_ port: any GuestOutputPort) {
        serial?.attach(port)
        nic?.attach(port)
    }

    /// Tells the network where the guest's MAC now is (QMP `announce-self`: QEMU sends
    /// gratuitous RARPs from the NIC, out through the agent, so switches learn the new port).
    /// Returns the round trip in nanoseconds; 0 without a NIC.
    @discardableResult
    public func announceSelf() throws(GeminusError) -> UInt64 {
        guard nic != nil else { return 0 }
        let t0 = Monotonic.nanos()
        try qmp.execute("announce-self", arguments: ["initial": 50, "max": 550, "rounds": 5, "step": 100])
        let nanos = Monotonic.nanos() - t0
        lock.withLock { lastAnnounceNanos = nanos }
        return nanos
    }

    /// The last `announceSelf` round trip (0 before one), for the takeover report.
    var announceNanos: UInt64 { lock.withLock { lastAnnounceNanos } }
    public func resume() throws(GeminusError) { try checkpointer.resume() }
    public func capture(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        try checkpointer.capture(full: full, into: buffer)
        try disk?.capture(full: full, into: buffer, qmp: qmp)
    }

    /// The NIC's frames wait for room in the output port (QEMU queues them meanwhile, and drops
    /// beyond its own queue): the agent keeps the guest paused until acknowledgements make room.
    public var outputStalled: Bool { nic?.isStalled ?? false }

    public var stoppedForGood: Bool { lock.withLock { isShutDown } && !process.isRunning }

    /// Kills QEMU (by pid) and removes its files. Idempotent.
    public func shutdown() {
        lock.lock()
        defer { lock.unlock() }
        guard !isShutDown else { return }
        isShutDown = true
        serial?.stop()
        nic?.stop()
        disk?.stop()
        qmp.close()
        process.cleanup(removeRAMFile: ownsRAMFile)
        unlink(deviceStatePath)
    }

    /// Kills QEMU at once (SIGKILL) without removing anything: a crash, for failover tests.
    public func crash() { process.kill(signal: SIGKILL) }
}
