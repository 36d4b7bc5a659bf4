import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// Where the time of a failover resume went (nanoseconds).
public struct ResumeTimings: Sendable, Equatable {
    /// Writing the committed device state to a file.
    public var writeStateNanos: UInt64 = 0
    /// Starting QEMU and connecting QMP (0 for a hot standby started in advance).
    public var startNanos: UInt64 = 0
    /// `migrate-set-capabilities` (0 when done in advance) + `migrate-incoming` + polling
    /// `query-migrate` until completed.
    public var loadNanos: UInt64 = 0
    /// `cont`, including retries while QEMU finalises the incoming migration.
    public var contNanos: UInt64 = 0
    public var contRetries: Int = 0
    /// Of `loadNanos`: the `migrate-incoming` round trip, and how many `query-migrate` polls.
    public var incomingCommandNanos: UInt64 = 0
    public var polls: Int = 0
    public var hot: Bool = false
    /// `announce-self` after `cont` (not part of `totalNanos`: the guest already runs).
    public var announceNanos: UInt64 = 0
    /// Flushing the replica disk and stopping the qemu-storage-daemon that wrote it (a qcow2
    /// replica: the standby QEMU takes the image's write lock as it resumes); 0 for a raw one.
    public var releaseDiskNanos: UInt64 = 0

    public init() {}
    public var totalNanos: UInt64 { writeStateNanos + releaseDiskNanos + startNanos + loadNanos + contNanos }
}

/// How the committed device state reaches the standby QEMU's `migrate-incoming`.
public enum IncomingTransport: String, Sendable {
    /// A pipe whose read end is passed over QMP (`getfd`) and read with `fd:NAME`: no file,
    /// no process; also works under libvirt's `-sandbox spawn=deny`.
    case fdPipe
    /// A file read by `exec:cat FILE` (QEMU spawns a shell): the recipe of DESIGN.md.
    case execCat
}

/// The secondary's QEMU: the replica lives in a RAM file on /dev/shm, and failover starts (or,
/// hot, has already started) QEMU on that file with `-incoming defer`, loads the committed
/// device state with `migrate-incoming` (x-ignore-shared: RAM is not in the stream) and `cont`s.
public final class QEMUStandby: StandbyHost, @unchecked Sendable {
    /// The primary's configuration with this host's paths (RAM file = the replica file).
    public let config: QEMUGuestConfig
    /// How the resumed guest finds its dirty pages; with write tracking, `config` must carry
    /// the preload library (`preloadWriteTracking`) so the standby QEMU has a userfaultfd.
    public let dirtyPages: DirtyPagePolicy
    /// Told why write tracking could not be had for the resumed guest.
    public let trackingFallback: @Sendable (GeminusError) -> Void
    public let hot: Bool
    /// Where the guest keeps its progress counter (nil: it keeps none).
    public let counterAddress: Int?
    public let deviceStatePath: String
    public let transport: IncomingTransport

    private let lock = NSLock()
    private var standbyProcess: QEMUProcess?
    private var standbyQMP: QMPClient?
    private var standbySerial: SerialOutput?
    private var standbyNIC: GuestNIC?
    /// The replica disk the standby QEMU opens (created before it starts).
    private var replicaDisk: FileReplicaDisk?
    private var capabilitiesSet = false
    private var resumed = false
    private var _lastResume: ResumeTimings?

    /// `config` names this host's files; its `incomingDefer` is forced on. With `hot`, QEMU
    /// is started by `makeReplicaMemory` and waits for the device state.
    public init(config: QEMUGuestConfig, hot: Bool = true, transport: IncomingTransport = .fdPipe,
                counterAddress: Int?, dirtyPages: DirtyPagePolicy = .compare,
                trackingFallback: @escaping @Sendable (GeminusError) -> Void = { _ in }) {
        self.dirtyPages = dirtyPages
        self.trackingFallback = trackingFallback
        self.transport = transport
        var c = config
        c.incomingDefer = true
        self.config = c
        self.hot = hot
        self.counterAddress = counterAddress
        deviceStatePath = c.ramFilePath + ".incoming"
    }

    public var lastResumeTimings: ResumeTimings? { lock.lock(); defer { lock.unlock() }; return _lastResume }
    /// The waiting standby QEMU's pid (hot standby, before resume).
    public var standbyPID: Int32? { lock.lock(); defer { lock.unlock() }; return standbyProcess?.pid }

    public var expectedPageCount: Int? { config.pageCount }

    public func checkHealth() -> [String: String] {
        let (process, qmp, done) = lock.withLock { (standbyProcess, standbyQMP, resumed) }
        let state: String
        if done {
            state = "resumed"
        } else if !hot {
            state = "cold (QEMU starts at failover)"
        } else if let process, process.isRunning, let qmp, qmp.state != .closed,
                  let status = try? qmp.execute("query-status", timeout: 1) as? [String: Any], status["running"] as? Bool == false {
            state = "ready"
        } else {
            state = process == nil ? "not started (starts with the first full checkpoint)" : "DOWN (the standby QEMU does not answer)"
        }
        return ["guest": "qemu", "standby": state]
    }

    public func makeReplicaMemory(pageCount: Int) throws(GeminusError) -> PageMemory {
        guard pageCount == config.pageCount else {
            throw GeminusError(.invalidArgument, "the replica has \(pageCount) pages but the standby QEMU is configured for \(config.pageCount) (\(config.ramMiB) MiB)")
        }
        try Self.preallocate(path: config.ramFilePath, bytes: pageCount * GuestPage.size)
        let memory = try PageMemory(fileAt: config.ramFilePath, pageCount: pageCount, create: false)
        if hot {
            lock.lock()
            defer { lock.unlock() }
            try startStandbyLocked()
            try setCapabilitiesLocked()
        }
        return memory
    }

    /// Creates (or empties this agent's own) replica file and preallocates it: the first touch
    /// of a fresh tmpfs page is slow, and failing now beats failing at failover. An existing
    /// file is kept (a waiting standby QEMU has it mapped) but must be this agent's, not a link.
    static func preallocate(path: String, bytes: Int) throws(GeminusError) {
        let fd = try PrivateFile.openOrCreate(path, what: "the replica RAM file").fd
        defer { close(fd) }
        guard ftruncate(fd, 0) == 0 else {
            throw GeminusError(.io, "cannot empty the replica RAM file \(path): \(String(cString: strerror(errno)))")
        }
        do throws(GeminusError) {
            try reserve(fd: fd, bytes: bytes, path: path)
        } catch {
            unlink(path)
            throw error
        }
    }

    /// Reserves every byte of a replica RAM file before anything is written into its mapping:
    /// on a full tmpfs a write through the mapping is a SIGBUS in the middle of a commit (a
    /// torn replica), while a failed reservation is an error the operator can act on (M4).
    public static func reserve(fd: Int32, bytes: Int, path: String) throws(GeminusError) {
        let r = posix_fallocate(fd, 0, off_t(bytes))
        guard r == 0 else {
            let dir = (path as NSString).deletingLastPathComponent
            throw GeminusError(.resourceExhausted, "cannot reserve \(bytes >> 20) MiB for the replica RAM file \(path): \(String(cString: strerror(r)))",
                               fix: "free space on the filesystem of \(dir) (df \(dir); tmpfs: mount -o remount,size=… or a larger /dev/shm), or protect a smaller VM")
        }
    }

    private func startStandbyLocked() throws(GeminusError) {
        if let p = standbyProcess, p.isRunning, standbyQMP?.state != .closed { return }
        standbyProcess?.cleanup(removeRAMFile: false)
        standbyProcess = nil
        standbyQMP = nil
        capabilitiesSet = false
        // The NIC's socket is bound before QEMU starts; nothing reads it into a port until the
        // resumed guest's output is attached.
        standbyNIC?.stop()
        standbyNIC = try config.nic.map { n throws(GeminusError) in try GuestNIC(n) }
        _ = try replicaDiskLocked()
        let p = try QEMULauncher.start(config)
        do throws(GeminusError) {
            standbyQMP = try QEMUGuest.connectQMP(p)
            // Connected now, before it can run: nothing it prints after the resume is missed.
            standbySerial?.stop()
            standbySerial = try config.serialSocketPath.map { path throws(GeminusError) in try SerialOutput(socketPath: path, peer: .process(p.pid)) }
            standbyProcess = p
        } catch {
            p.cleanup(removeRAMFile: false)
            throw error
        }
    }

    public func makeReplicaDisk() throws(GeminusError) -> (any ReplicaDisk)? {
        lock.lock()
        defer { lock.unlock() }
        return try replicaDiskLocked()
    }

    private func replicaDiskLocked() throws(GeminusError) -> FileReplicaDisk? {
        guard let d = config.disk else { return nil }
        if let r = replicaDisk { return r }
        let r = try FileReplicaDisk(path: d.path, sizeBytes: d.sizeBytes)
        replicaDisk = r
        return r
    }

    private func setCapabilitiesLocked() throws(GeminusError) {
        guard !capabilitiesSet, let qmp = standbyQMP else { return }
        try IncomingMigration.enableIgnoreShared(qmp)
        capabilitiesSet = true
    }

    public func resume(memory: PageMemory, deviceState: [UInt8], output: any GuestOutputPort) throws(GeminusError) -> any ProtectedGuest {
        let guest = try resumeGuest(memory: memory, deviceState: deviceState)
        guest.attachOutput(output)
        // The guest's MAC is now behind this host's port: say so before anyone waits long.
        if let nanos = try? guest.announceSelf() { lock.withLock { _lastResume?.announceNanos = nanos } }
        return guest
    }

    /// `resume` with the concrete type.
    public func resumeGuest(memory: PageMemory, deviceState: [UInt8], migrationTimeout: Double = 10) throws(GeminusError) -> QEMUGuest {
        lock.lock()
        defer { lock.unlock() }
        guard !resumed else { throw GeminusError(.internalInvariant, "this standby has already resumed its guest") }
        guard memory.pageCount == config.pageCount else {
            throw GeminusError(.invalidArgument, "replica memory has \(memory.pageCount) pages, the standby QEMU \(config.pageCount)")
        }
        guard !deviceState.isEmpty else { throw GeminusError(.invalidArgument, "no committed device state to resume from") }
        // The replica disk becomes the running guest's disk: mirrored from here once this host
        // protects it onto the other (its first full checkpoint carries the whole disk). Its
        // export starts before the guest runs, so nothing can fail after `cont`.
        let disk = try config.disk.map { d throws(GeminusError) in try ReplicatedDisk(d) }
        var started = false
        defer { if !started { disk?.stop() } }
        var t = ResumeTimings()
        t.hot = standbyProcess?.isRunning == true && standbyQMP?.state != .closed

        var t0 = Monotonic.nanos()
        var pipeReadEnd: Int32 = -1
        defer { if pipeReadEnd >= 0 { close(pipeReadEnd) } }
        switch transport {
        case .execCat:
            unlink(deviceStatePath)
            let fd = try PrivateFile.createNew(deviceStatePath, what: "the device-state file")
            defer { close(fd) }
            try pwriteAll(fd, deviceState, at: 0, what: "the device-state file \(deviceStatePath)")
        case .fdPipe:
            pipeReadEnd = try IncomingMigration.pipe(holding: deviceState)
        }
        t.writeStateNanos = Monotonic.nanos() - t0

        t0 = Monotonic.nanos()
        if !t.hot { try startStandbyLocked() }
        t.startNanos = Monotonic.nanos() - t0
        guard let process = standbyProcess, let qmp = standbyQMP else {
            throw GeminusError(.internalInvariant, "standby QEMU missing after start")
        }
        do throws(GeminusError) {
            t0 = Monotonic.nanos()
            try setCapabilitiesLocked()
            switch transport {
            case .execCat:
                try qmp.execute("migrate-incoming", arguments: ["uri": "exec:cat \(Self.shellQuote(deviceStatePath))"])
            case .fdPipe:
                try IncomingMigration.startFromPipe(qmp, readEnd: pipeReadEnd)
                close(pipeReadEnd)
                pipeReadEnd = -1
            }
            t.incomingCommandNanos = Monotonic.nanos() - t0
            t.polls = try IncomingMigration.waitCompleted(qmp, timeout: migrationTimeout)
            t.loadNanos = Monotonic.nanos() - t0

            t0 = Monotonic.nanos()
            t.contRetries = try IncomingMigration.contRetrying(qmp)
            t.contNanos = Monotonic.nanos() - t0
        } catch {
            var e = error
            if !process.isRunning { e.message += " (standby QEMU exited: \(process.stderrTail()))" }
            throw e
        }
        unlink(deviceStatePath)
        resumed = true
        _lastResume = t
        standbyProcess = nil
        standbyQMP = nil
        let serial = standbySerial
        standbySerial = nil
        let nic = standbyNIC
        standbyNIC = nil
        started = true
        let finder = dirtyPages.makeFinderForResumedGuest(qemuPID: process.pid, ramFilePath: config.ramFilePath, fallback: trackingFallback)
        return QEMUGuest(process: process, qmp: qmp, memory: memory, counterAddress: counterAddress, finder: finder, serial: serial, nic: nic, disk: disk)
    }

    /// Stops a waiting standby QEMU and removes the replica file and other files (not a
    /// resumed guest's: that one belongs to the returned `QEMUGuest`).
    public func cleanup() {
        lock.lock()
        defer { lock.unlock() }
        standbyQMP?.close()
        standbySerial?.stop()
        standbySerial = nil
        standbyNIC?.stop()
        standbyNIC = nil
        standbyProcess?.cleanup(removeRAMFile: false)
        standbyProcess = nil
        standbyQMP = nil
        unlink(deviceStatePath)
        if !resumed {
            unlink(config.ramFilePath)
            for path in config.sideFiles { unlink(path) }
            if let d = config.disk { unlink(d.path) }
        }
    }

    static func shellQuote(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }
}
