import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// A replica disk in an image QEMU must place the bytes of (qcow2): the guest's writes are
/// guest-visible offsets, which in a qcow2 file are wherever its clusters are, so they are
/// written through QEMU's own qcow2 driver, in a qemu-storage-daemon this agent starts on the
/// image and talks to over NBD (`NBDClient`). Crash safety is `JournaledReplicaDisk`'s, the
/// same as a raw file's: the backend's sync is an NBD FLUSH, after which QEMU has written the
/// image's metadata and fdatasynced it.
///
/// The daemon holds the image (and QEMU's write lock on it) until `release()`: the standby QEMU
/// takes that lock when its incoming migration completes, so the standby releases the disk
/// before it resumes (`LibvirtStandby.resumeGuest`). The standby QEMU, inactive until then,
/// re-reads the qcow2 metadata at activation (the shared-storage migration contract), so it
/// sees what the daemon wrote.
public final class StorageDaemonReplicaDisk: ReplicaDisk {
    public let imagePath: String
    public let daemon: StorageDaemon
    private let backend: NBDBlockBackend
    let journaled: JournaledReplicaDisk
    public var sizeBytes: UInt64 { backend.sizeBytes }
    public var lastRecovery: DiskRecovery { journaled.lastRecovery }

    /// Starts the daemon on `imagePath` (a qcow2 file), connects, and recovers whatever a crash
    /// left in the journal (`<image>.geminus-journal` unless `journalPath` says otherwise).
    /// `runDirectory` holds the daemon's socket, pid file and log, named after `name`.
    public init(imagePath: String, format: String = "qcow2", runDirectory: String, name: String,
                journalPath: String? = nil) throws(GeminusError) {
        self.imagePath = imagePath
        let started = try StorageDaemon.start(imagePath: imagePath, format: format, runDirectory: runDirectory, name: name)
        do throws(GeminusError) {
            let nbd = NBDBlockBackend(client: try started.connect(), imagePath: imagePath)
            journaled = try JournaledReplicaDisk(backend: nbd, journalPath: journalPath ?? imagePath + ".geminus-journal")
            backend = nbd
            daemon = started
        } catch {
            started.stop()
            throw error
        }
    }

    deinit { _ = release() }

    /// Makes what was written durable, closes the connection and stops the daemon, which then
    /// no longer holds the image. Idempotent; nothing can be written after. Returns how long it
    /// took, or why the image may not be whole on disk (the FLUSH failed). A daemon that does
    /// not exit when asked is killed: after a FLUSH that succeeded its image is complete.
    @discardableResult
    public func release() -> Result<UInt64, GeminusError> {
        let t0 = Monotonic.nanos()
        guard !backend.isClosed else { return .success(0) }
        var failure: GeminusError?
        do throws(GeminusError) { try backend.client.flush() } catch { failure = error }
        backend.close()
        daemon.stop()
        if let failure { return .failure(failure) }
        return .success(Monotonic.nanos() - t0)
    }

    public func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) { try journaled.write(offset: offset, data) }
    public func zero(offset: UInt64, length: UInt64) throws(GeminusError) { try journaled.zero(offset: offset, length: length) }
    public func zeroAll() throws(GeminusError) { try journaled.zeroAll() }
    public func sync() throws(GeminusError) { try journaled.sync() }
    public func commit(_ epoch: DiskCommit) throws(GeminusError) { try journaled.commit(epoch) }
    @discardableResult
    public func recover() throws(GeminusError) -> DiskRecovery { try journaled.recover() }
}

/// The guest-visible disk of an image served over NBD.
final class NBDBlockBackend: BlockBackend {
    let client: NBDClient
    let imagePath: String
    private(set) var isClosed = false
    var sizeBytes: UInt64 { client.sizeBytes }
    var name: String { "the replica disk \(imagePath) (through qemu-storage-daemon)" }

    init(client: NBDClient, imagePath: String) {
        self.client = client
        self.imagePath = imagePath
    }

    func close() {
        isClosed = true
        client.disconnect()
    }

    private func open() throws(GeminusError) {
        guard !isClosed else {
            throw GeminusError(.internalInvariant, "\(name) was written after it was released to the resumed guest")
        }
    }

    func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
        try open()
        try client.write(offset: offset, data)
    }

    func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
        try open()
        try client.writeZeroes(offset: offset, length: length)
    }

    func zeroAll() throws(GeminusError) { try zero(offset: 0, length: sizeBytes) }

    func sync() throws(GeminusError) {
        try open()
        try client.flush()
    }
}

/// A qemu-storage-daemon serving one image over NBD on a unix socket, started and stopped by
/// this agent. Its pid file lets the next agent stop one that an agent killed left behind
/// (it would hold the image's write lock).
public final class StorageDaemon: @unchecked Sendable {
    public let imagePath: String
    public let socketPath: String
    public let pidPath: String
    public let logPath: String
    /// Its QMP monitor: `quit` is how it is stopped. SIGTERM was seen ignored by a daemon this
    /// (Swift) process spawned, for 10 s until SIGKILL, likely a blocked mask it inherited;
    /// `quit` stops it in about 5 ms.
    public let qmpPath: String
    public static let exportName = "geminus-replica"
    public static let installHint = "apt-get install -y --no-install-recommends qemu-system-x86 (it ships qemu-storage-daemon)"
    private let process: Process

    private init(imagePath: String, socketPath: String, pidPath: String, logPath: String, qmpPath: String, process: Process) {
        self.imagePath = imagePath
        self.socketPath = socketPath
        self.qmpPath = qmpPath
        self.pidPath = pidPath
        self.logPath = logPath
        self.process = process
    }

    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }

    /// The daemon's command line: the image through QEMU's `format` driver, exported writable.
    /// `--blockdev` in JSON: a file name may hold commas, which the key=value syntax splits on.
    static func arguments(imagePath: String, format: String, socketPath: String, pidPath: String, qmpPath: String) -> [String] {
        let blockdev: [String: Any] = ["driver": format, "node-name": "replica",
                                       "file": ["driver": "file", "filename": imagePath]]
        let json = (try? JSONSerialization.data(withJSONObject: blockdev, options: [.sortedKeys]))
            .map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return ["--blockdev", json,
                "--nbd-server", "addr.type=unix,addr.path=\(socketPath)",
                "--export", "type=nbd,id=replica,node-name=replica,name=\(exportName),writable=on",
                "--chardev", "socket,id=qmp,path=\(qmpPath),server=on,wait=off",
                "--monitor", "chardev=qmp",
                "--pidfile", pidPath]
    }

    /// Starts the daemon and waits until its socket accepts (or it exits: its log says why,
    /// e.g. another process holds the image's write lock).
    public static func start(imagePath: String, format: String, runDirectory: String, name: String,
                             timeout: Double = 10) throws(GeminusError) -> StorageDaemon {
        guard let binary = QEMULauncher.locate("qemu-storage-daemon") else {
            throw GeminusError(.hypervisor, "qemu-storage-daemon not found: a \(format) replica image is written through it", fix: installHint)
        }
        let socketPath = "\(runDirectory)/\(name).replica.nbd"
        let pidPath = "\(runDirectory)/\(name).replica.pid"
        let logPath = "\(runDirectory)/\(name).replica.log"
        let qmpPath = "\(runDirectory)/\(name).replica.qmp"
        stopLeftover(pidPath: pidPath, socketPath: socketPath, qmpPath: qmpPath)
        unlink(socketPath)
        unlink(qmpPath)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = arguments(imagePath: imagePath, format: format, socketPath: socketPath, pidPath: pidPath, qmpPath: qmpPath)
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        // Created afresh, never through a link left in the run directory.
        unlink(logPath)
        p.standardError = FileHandle(fileDescriptor: try PrivateFile.createNew(logPath, what: "the storage daemon's log"), closeOnDealloc: true)
        do { try p.run() } catch {
            throw GeminusError(.hypervisor, "cannot start \(binary): \(error)", fix: installHint)
        }
        let daemon = StorageDaemon(imagePath: imagePath, socketPath: socketPath, pidPath: pidPath, logPath: logPath, qmpPath: qmpPath, process: p)
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        while access(socketPath, F_OK) != 0 {
            if !p.isRunning {
                throw GeminusError(.hypervisor, "qemu-storage-daemon on \(imagePath) exited at its start: \(daemon.logTail())",
                                   fix: "check that no other process holds the image (a running VM, a leftover daemon) and that it is a \(format) image")
            }
            if Monotonic.nanos() >= deadline {
                daemon.stop()
                throw GeminusError(.hypervisor, "qemu-storage-daemon on \(imagePath) did not open \(socketPath) within \(timeout) s: \(daemon.logTail())")
            }
            Monotonic.sleep(nanos: 2_000_000)
        }
        return daemon
    }

    /// The NBD connection to the image.
    func connect() throws(GeminusError) -> NBDClient {
        try NBDClient(socketPath: socketPath, exportName: Self.exportName, peer: .process(process.processIdentifier))
    }

    /// QMP `quit` (QEMU flushes and closes its images, releasing their locks; SIGTERM where the
    /// monitor does not answer), then SIGKILL if it has not exited within `timeout` s. Returns
    /// whether it exited when asked.
    @discardableResult
    public func stop(timeout: Double = 10) -> Bool {
        guard process.isRunning else { return true }
        if let qmp = try? QMPClient(socketPath: qmpPath, connectTimeout: 1, defaultTimeout: 2, peer: .process(process.processIdentifier)) {
            // The reply may or may not come before the monitor closes: the exit is what counts.
            _ = try? qmp.execute("quit")
            qmp.close()
        } else {
            kill(process.processIdentifier, SIGTERM)
        }
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        var asked = true
        while process.isRunning {
            if Monotonic.nanos() >= deadline {
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
                asked = false
                break
            }
            Monotonic.sleep(nanos: 200_000)
        }
        for path in [socketPath, qmpPath, pidPath] { unlink(path) }
        // An empty log says nothing; one with the daemon's words stays for the operator.
        var st = stat()
        if stat(logPath, &st) == 0 && st.st_size == 0 { unlink(logPath) }
        return asked
    }

    /// A daemon an earlier agent started on the same socket (its pid file, its command line
    /// naming the socket) and left running when it died: it is stopped (QMP `quit`, SIGKILL
    /// after 5 s; like ours, it may ignore SIGTERM).
    static func stopLeftover(pidPath: String, socketPath: String, qmpPath: String) {
        guard let text = try? String(contentsOfFile: pidPath, encoding: .utf8),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 1,
              let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
              String(decoding: cmdline, as: UTF8.self).contains(socketPath) else { return }
        if let qmp = try? QMPClient(socketPath: qmpPath, connectTimeout: 1, defaultTimeout: 2, peer: .process(pid)) {
            _ = try? qmp.execute("quit")
            qmp.close()
        } else {
            kill(pid, SIGTERM)
        }
        let deadline = Monotonic.nanos() + 5_000_000_000
        while kill(pid, 0) == 0 && Monotonic.nanos() < deadline { Monotonic.sleep(nanos: 5_000_000) }
        if kill(pid, 0) == 0 {
            kill(pid, SIGKILL)
            // Gone once reaped; its locks go with its descriptors at exit.
            Monotonic.sleep(nanos: 100_000_000)
        }
        unlink(pidPath)
    }

    func logTail(_ bytes: Int = 600) -> String {
        guard let d = FileManager.default.contents(atPath: logPath) else { return "(no log)" }
        let text = String(decoding: d.suffix(bytes), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return text.isEmpty ? "(its log \(logPath) is empty)" : text
    }
}
