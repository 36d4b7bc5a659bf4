import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// What a QEMU guest is started from: the small set of flags verified under QEMU 7.2 TCG.
public struct QEMUGuestConfig: Sendable {
    public var ramMiB: Int
    public var kernelPath: String
    public var append: String
    /// Guest RAM file (memory-backend-file, share=on), in the agent's run directory on /dev/shm.
    public var ramFilePath: String
    public var qmpSocketPath: String
    public var serialLogPath: String
    /// When set, COM1 is a unix socket QEMU listens on (the agent reads it as the guest's output,
    /// `SerialOutput`), still logged in full to `serialLogPath`; otherwise COM1 goes to the log only.
    public var serialSocketPath: String?
    /// When set, the guest has a NIC whose frames go to the agent (`GuestNIC`).
    public var nic: NICSetup?
    /// When set, the guest has a replicated disk (`ReplicatedDisk`).
    public var disk: DiskSetup?
    /// Standby: `-incoming defer -global migration.send-configuration=off`.
    public var incomingDefer: Bool
    public var qemuBinary: String
    /// QEMU's own stderr; nil discards it.
    public var stderrLogPath: String?
    /// Variables added to (or replacing those of) this process's environment for QEMU, e.g.
    /// `LD_PRELOAD` of the write-tracking library (`WriteTrackingPreload`).
    public var environment: [String: String]
    /// Appended to the command line as they are (e.g. `-incoming defer` for a plain migration
    /// target in the benchmark).
    public var extraArguments: [String] = []

    public init(ramMiB: Int, kernelPath: String, append: String, ramFilePath: String, qmpSocketPath: String,
                serialLogPath: String, incomingDefer: Bool = false, qemuBinary: String = "qemu-system-x86_64",
                stderrLogPath: String? = nil, environment: [String: String] = [:]) {
        self.ramMiB = ramMiB
        self.kernelPath = kernelPath
        self.append = append
        self.ramFilePath = ramFilePath
        self.qmpSocketPath = qmpSocketPath
        self.serialLogPath = serialLogPath
        self.incomingDefer = incomingDefer
        self.qemuBinary = qemuBinary
        self.stderrLogPath = stderrLogPath
        self.environment = environment
    }

    public var pageCount: Int { ramMiB * (1 << 20) / GuestPage.size }

    /// The files QEMU makes beside its RAM file (sockets and logs): removed with it.
    var sideFiles: [String] { [qmpSocketPath, serialLogPath, stderrLogPath, serialSocketPath].compactMap { $0 } }

    /// Every file of this guest, each of which must be in a private run directory.
    var allFiles: [String] {
        [ramFilePath] + sideFiles + [nic?.socketPath, disk?.path, disk?.exportSocketPath].compactMap { $0 }
    }

    /// Gives the guest a NIC with `mac`, its sockets beside the QMP socket.
    public mutating func addNIC(mac: MACAddress) {
        nic = NICSetup(mac: mac, socketPath: sideFileBase + ".nic")
    }

    /// Gives the guest a raw disk of `sizeBytes`, the file and its export socket beside the QMP
    /// socket.
    public mutating func addDisk(sizeBytes: UInt64) {
        disk = DiskSetup(path: sideFileBase + ".disk", sizeBytes: sizeBytes, exportSocketPath: sideFileBase + ".nbd")
    }

    /// The QMP socket's path without `.qmp`: the NIC and disk files are named after it.
    private var sideFileBase: String { qmpSocketPath.hasSuffix(".qmp") ? String(qmpSocketPath.dropLast(4)) : qmpSocketPath }

    /// Files derived from this guest's names, one set per QEMU, so several can run side by side,
    /// all in `runDirectory`: by default the agent's private one (`RunDirectory.agent`; QEMU
    /// refuses to start with files in a directory that is not private, see `QEMULauncher.start`).
    /// `tag` should be unique in the directory (e.g. a VM name, a role and the agent's pid).
    public static func standard(tag: String, ramMiB: Int, kernelPath: String, append: String,
                                runDirectory: String? = nil) -> QEMUGuestConfig {
        let directory = runDirectory ?? RunDirectory.agent
        let run = directory.hasSuffix("/") ? String(directory.dropLast()) : directory
        return QEMUGuestConfig(ramMiB: ramMiB, kernelPath: kernelPath, append: append,
                               ramFilePath: "\(run)/\(tag).ram",
                               qmpSocketPath: "\(run)/\(tag).qmp",
                               serialLogPath: "\(run)/\(tag).serial",
                               stderrLogPath: "\(run)/\(tag).stderr")
    }
}

/// Builds QEMU command lines and starts QEMU processes.
public enum QEMULauncher {
    /// The argv (without the binary) for `config`.
    public static func arguments(for c: QEMUGuestConfig) -> [String] {
        var a = [
            "-accel", "tcg",
            "-machine", "pc,memory-backend=pc.ram",
            "-m", "\(c.ramMiB)",
            "-object", "memory-backend-file,id=pc.ram,size=\(c.ramMiB)M,mem-path=\(c.ramFilePath),share=on",
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-kernel", c.kernelPath,
            "-append", c.append,
            "-chardev", c.serialSocketPath.map { "socket,id=s0,path=\($0),server=on,wait=off,logfile=\(c.serialLogPath)" }
                ?? "file,id=s0,path=\(c.serialLogPath)",
            "-device", "isa-serial,chardev=s0",
            "-qmp", "unix:\(c.qmpSocketPath),server=on,wait=off",
        ]
        if let nic = c.nic { a += nic.qemuArguments }
        if let disk = c.disk { a += disk.qemuArguments }
        if c.incomingDefer {
            a += ["-incoming", "defer", "-global", "migration.send-configuration=off"]
        }
        return a + c.extraArguments
    }

    /// Finds `name` in PATH (or checks it when it holds a slash).
    public static func locate(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    public static let installHint = "apt-get install -y --no-install-recommends qemu-system-x86"

    /// Starts QEMU for `config`, whose files must all be in private run directories
    /// (`RunDirectory.checkPrivate`). A stale QMP socket file is removed first. The RAM file is
    /// QEMU's to open, never to create: an existing one must be this agent's own (a standby
    /// runs on the replica's contents; a fresh primary creates it first, `QEMUGuest.launch`), a
    /// missing one is created mode 0600 and sized here. QEMU's NIC and disk-export connections
    /// are accepted from this QEMU's pid only.
    public static func start(_ config: QEMUGuestConfig) throws(GeminusError) -> QEMUProcess {
        guard let binary = locate(config.qemuBinary) else {
            throw GeminusError(.hypervisor, "\(config.qemuBinary) not found", fix: installHint)
        }
        try RunDirectory.checkPrivate(directoriesOf: config.allFiles)
        try prepareRAMFile(config)
        unlink(config.qmpSocketPath)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = arguments(for: config)
        if !config.environment.isEmpty {
            p.environment = ProcessInfo.processInfo.environment.merging(config.environment) { _, new in new }
        }
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        if let log = config.stderrLogPath {
            unlink(log)
            p.standardError = FileHandle(fileDescriptor: try PrivateFile.createNew(log, what: "QEMU's log"), closeOnDealloc: true)
        } else {
            p.standardError = FileHandle.nullDevice
        }
        do {
            try p.run()
        } catch {
            throw GeminusError(.hypervisor, "cannot start \(binary): \(error)", fix: installHint)
        }
        for path in [config.nic?.socketPath, config.disk?.exportSocketPath].compactMap({ $0 }) {
            UnixSocket.expect(.process(p.processIdentifier), onListenerAt: path)
        }
        return QEMUProcess(process: p, config: config)
    }

    /// The RAM file exists before QEMU starts, mode 0600, this agent's (QEMU would create a
    /// missing one 0644, readable by every local user).
    static func prepareRAMFile(_ config: QEMUGuestConfig) throws(GeminusError) {
        let (fd, created) = try PrivateFile.openOrCreate(config.ramFilePath, what: "the RAM file")
        defer { close(fd) }
        let bytes = off_t(config.ramMiB) << 20
        if created, ftruncate(fd, bytes) != 0 {
            let e = errno
            unlink(config.ramFilePath)
            throw GeminusError(.resourceExhausted, "cannot size the RAM file \(config.ramFilePath) to \(config.ramMiB) MiB: \(String(cString: strerror(e)))")
        }
    }
}

/// A QEMU process this agent started.
public final class QEMUProcess: @unchecked Sendable {
    public let config: QEMUGuestConfig
    public let pid: Int32
    private let process: Process

    init(process: Process, config: QEMUGuestConfig) {
        self.process = process
        self.config = config
        pid = process.processIdentifier
    }

    public var isRunning: Bool { process.isRunning }

    /// The tail of QEMU's stderr log, for error messages.
    public func stderrTail(_ bytes: Int = 600) -> String {
        guard let path = config.stderrLogPath, let d = FileManager.default.contents(atPath: path) else { return "" }
        return String(decoding: d.suffix(bytes), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Sends `signal` to this QEMU (by pid) and waits up to `timeout` s for it to exit.
    /// Returns whether it has exited.
    @discardableResult
    public func kill(signal: Int32 = SIGKILL, timeout: Double = 5) -> Bool {
        if process.isRunning { _ = Glibc.kill(pid, signal) }
        return waitForExit(timeout: timeout)
    }

    @discardableResult
    public func waitForExit(timeout: Double) -> Bool {
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        while process.isRunning {
            if Monotonic.nanos() >= deadline { return false }
            Monotonic.sleep(nanos: 1_000_000)
        }
        return true
    }

    /// Kills QEMU and removes its socket and logs; the RAM file too when `removeRAMFile`.
    public func cleanup(removeRAMFile: Bool) {
        kill()
        for path in config.sideFiles { unlink(path) }
        if removeRAMFile { unlink(config.ramFilePath) }
    }
}
