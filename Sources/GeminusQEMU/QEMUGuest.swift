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
    /// Guest-physical address of the guest's progress counter (u64); nil for a guest that keeps
    /// none (then `progressCounter` is 0).
    public let counterAddress: Int?
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

    /// Where the tiny test guest (Tools/guest) keeps its progress counter. No signature defaults
    /// to it: callers that run the tiny guest (tests, bench, demo, and the agent's
    /// `--counter-address` default) pass it.
    public static let tinyGuestCounterAddress = 0x200008

    public var pageCount: Int { memory.pageCount }
    public var progressCounter: UInt64 { counterAddress.map { memory.loadU64(at: $0) } ?? 0 }
    public var lastCaptureParts: CaptureParts? { checkpointer.lastCaptureParts }
    /// Chooses the dirty-page method once QEMU runs (write tracking needs its pid); before the
    /// first capture, which is full.
    public func useFinder(_ finder: any DirtyPageFinder) { checkpointer.useFinder(finder) }
    public var statusReport: [String: String] {
        var r = checkpointer.dirtyPageReport.merging(["guest": "qemu"]) { _, new in new }
        if let nic {
            r["nic"] = nic.statusLine
        }
        if let disk {
            r["disk"] = disk.statusLine
        }
        return r
    }
    /// The timings of the last complete pause → capture → resume cycle.
    public var lastTimings: CaptureTimings? { checkpointer.lastTimings }

    /// Wraps a running QEMU (its QMP already connected, its RAM file mapped).
    public init(process: QEMUProcess, qmp: QMPClient, memory: PageMemory, counterAddress: Int?,
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

    /// Where QEMU gets the write-tracking preload library from (`launch`'s `preload`).
    public enum Preload: Sendable {
        /// As `config` says: it carries the library already (`preloadWriteTracking`), or QEMU
        /// runs without it.
        case asConfigured
        /// This library is added to QEMU's `LD_PRELOAD`. nil (not found): with `.auto`, capture
        /// uses the compare method and `fallback` hears why once; with `.tracking` it is an error.
        case library(String?)
    }

    /// Starts a fresh guest (the one way to start one that is not a standby): deletes a stale
    /// RAM file, starts QEMU, connects QMP, maps RAM, then chooses the dirty-page finder by
    /// `dirtyPages` once QEMU runs (write tracking needs its pid).
    ///
    /// - `counterAddress`: where the guest keeps its progress counter, nil if it keeps none.
    /// - `dirtyPages`: compare (the default), write tracking, or tracking when possible. With
    ///   `.auto`, a guest that cannot be tracked gets the compare method and `fallback` hears why;
    ///   with `.tracking` that is an error and QEMU is stopped again.
    /// - `preload`: where the write-tracking library comes from (see `Preload`).
    /// `finder` tells which method was chosen.
    public static func launch(_ config: QEMUGuestConfig, counterAddress: Int?, dirtyPages: DirtyPagePolicy = .compare,
                              preload: Preload = .asConfigured, fallback: (GeminusError) -> Void = { _ in })
        throws(GeminusError) -> (guest: QEMUGuest, finder: any DirtyPageFinder) {
        precondition(!config.incomingDefer, "launch a standby through QEMUStandby")
        var config = config
        var dirtyPages = dirtyPages
        if case .library(let library) = preload {
            if let library {
                config.preloadWriteTracking(library: library)
            } else if dirtyPages.method != .compare {
                // No library: say why once (the kernel first, as the finder would), and do not
                // look for a descriptor QEMU cannot have.
                do throws(GeminusError) { _ = try WriteTrackingPreload.require() } catch {
                    let why = WriteTrackingFinder.probe() ?? error
                    if dirtyPages.method == .tracking { throw why }
                    fallback(why)
                    dirtyPages.method = .compare
                }
            }
        }
        let guest = try start(config, counterAddress: counterAddress)
        do throws(GeminusError) {
            let finder = try dirtyPages.makeFinder(qemuPID: guest.process.pid, ramFilePath: config.ramFilePath, fallback: fallback)
            guest.useFinder(finder)
            return (guest, finder)
        } catch {
            guest.shutdown()
            throw error
        }
    }

    /// QEMU started, QMP connected, RAM mapped; captures with the compare method until `launch`
    /// chooses the finder.
    private static func start(_ config: QEMUGuestConfig, counterAddress: Int?) throws(GeminusError) -> QEMUGuest {
        // A fresh guest's RAM file is new and this agent's from the first instant: whatever is
        // already at the path (planted, or a leftover) is refused, not reused.
        try RunDirectory.checkPrivate(directoriesOf: config.allFiles)
        close(try PrivateFile.createNew(config.ramFilePath, what: "the RAM file"))
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
            unlink(config.ramFilePath)
            throw error
        }
        do throws(GeminusError) {
            let qmp = try connectQMP(process)
            // QEMU has mapped the RAM file (created above) before it opens the QMP socket.
            let memory = try PageMemory(fileAt: config.ramFilePath, pageCount: config.pageCount, create: false)
            let serial = try config.serialSocketPath.map { path throws(GeminusError) in try SerialOutput(socketPath: path, peer: .process(process.pid)) }
            return QEMUGuest(process: process, qmp: qmp, memory: memory, counterAddress: counterAddress, serial: serial, nic: nic, disk: disk)
        } catch {
            nic?.stop()
            disk?.stop()
            process.cleanup(removeRAMFile: true)
            throw error
        }
    }

    static func connectQMP(_ process: QEMUProcess, timeout: Double = 10) throws(GeminusError) -> QMPClient {
        do throws(GeminusError) {
            return try QMPClient(socketPath: process.config.qmpSocketPath, connectTimeout: timeout, peer: .process(process.pid))
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
