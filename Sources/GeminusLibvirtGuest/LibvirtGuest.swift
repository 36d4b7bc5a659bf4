import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusLibvirt
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// The platform facts of a libvirt domain definition that a checkpoint depends on. libvirt
/// expands a machine alias at define time (`pc` becomes `pc-i440fx-7.2`), so two hosts'
/// definitions compare by the real machine type. The emulator's path is left out (hosts may
/// install QEMU in different places); its version is what matters.
public enum LibvirtPlatform {
    public static func of(xml: String, connection: LibvirtConnection) -> GuestPlatform {
        let f = CAEnrollmentCheck(xml: xml).facts
        var facts: [(name: String, value: String)] = []
        func add(_ name: String, _ value: (some CustomStringConvertible)?) {
            if let value { facts.append((name, "\(value)")) }
        }
        add("domain type", f.domainType)
        add("architecture", f.arch)
        add("machine type", f.machineType)
        add("QEMU version", try? connection.hypervisorVersion(timeout: 5))
        add("memory KiB", f.memoryKiB)
        add("vCPUs", f.vcpus)
        add("hugepages", f.hugepages ? "yes" : "no")
        return GuestPlatform(facts)
    }
}

/// Runs a libvirt call (untyped throws) with GeminusError as the only error.
func libvirt<T>(_ body: () throws -> T) throws(GeminusError) -> T {
    do {
        return try body()
    } catch let e as GeminusError {
        throw e
    } catch {
        throw GeminusError(.hypervisor, "\(error)")
    }
}

/// A running libvirt domain protected by the agent: the checkpoint cycle runs over the
/// domain's private QMP socket (not libvirt's passthrough), guest RAM is read from the shared
/// RAM file QEMU names, and the device state goes into a file passed with `add-fd`, so QEMU
/// (libvirt-qemu, sandboxed) needs no writable directory.
///
/// libvirt sees the `stop`/`cont` events on its own monitor and follows them: during a pause
/// `virsh domstate` says "paused (unknown)", after `cont` "running (unpaused)" (libvirt 9.0).
public final class LibvirtGuest: ProtectedGuest, @unchecked Sendable {
    public let connection: LibvirtConnection
    public let domain: LibvirtDomain
    public let domainName: String
    /// Where the guest keeps its progress counter (nil: it keeps none; `progressCounter` is 0).
    public let counterAddress: Int?
    public let checkpointer: QMPCheckpointer
    private let deviceStateFD: DeviceStateFD
    private let ramPath: String
    private let pid: Int32?
    public let platform: GuestPlatform
    private let lock = NSLock()
    private var released = false
    /// The held NICs (`<interface type='server'>` moved there by `enroll --prepare`), in record order.
    public let nics: [GuestNIC]
    /// The replicated disk (the domain's writable disk, mirrored to this agent), if it has one.
    public let disk: ReplicatedDisk?
    /// How this guest was resumed on a standby (nil: it was not): the takeover report's figures.
    public internal(set) var resumeTimings: ResumeTimings?

    init(connection: LibvirtConnection, domain: LibvirtDomain, qmp: QMPClient, memory: PageMemory, ramFilePath: String,
         counterAddress: Int?, finder: any DirtyPageFinder, platform: GuestPlatform? = nil, nics: [GuestNIC] = [],
         disk: ReplicatedDisk? = nil) throws(GeminusError) {
        self.connection = connection
        self.nics = nics
        self.disk = disk
        self.domain = domain
        self.domainName = domain.name
        self.counterAddress = counterAddress
        self.ramPath = ramFilePath
        self.deviceStateFD = try DeviceStateFD.register(with: qmp)
        self.checkpointer = QMPCheckpointer(qmp: qmp, memory: memory, target: .descriptorSet(deviceStateFD), finder: finder)
        self.pid = connection.qemuPid(of: domain)
        // A standby passes the platform it already read from the same definition, which keeps
        // two libvirt calls off the failover path.
        self.platform = platform
            ?? (try? connection.xml(of: domain, .live)).map { LibvirtPlatform.of(xml: $0, connection: connection) } ?? GuestPlatform()
    }

    /// Attaches to a RUNNING libvirt domain whose definition has the private QMP socket and
    /// shared file memory. `counterAddress`: where the guest keeps its progress counter, nil if
    /// it keeps none.
    public static func attach(connection: LibvirtConnection, domainName: String, counterAddress: Int?,
                              dirtyPages: DirtyPagePolicy = .compare, fallback: (GeminusError) -> Void = { _ in },
                              timeout: Double = 10) throws(GeminusError) -> LibvirtGuest {
        let domain = try libvirt { try connection.lookupDomain(named: domainName, timeout: timeout) }
        guard try libvirt({ try connection.isActive(domain, timeout: timeout) }) else {
            throw GeminusError(.invalidArgument, "domain '\(domainName)' is not running", fix: "start it: `virsh start \(domainName)`")
        }
        // What the domain runs with now, not what its definition will say at the next start:
        // a balloon or a vhost-user device in the running domain makes every checkpoint inexact.
        let live = try libvirt { try connection.xml(of: domain, .live, timeout: timeout) }
        if let problem = CAEnrollmentCheck(xml: live).error {
            var e = problem
            e.fix = "`geminus enroll \(domainName) --peer HOST --prepare` changes the definition; restart the domain to apply it"
            throw e
        }
        let qmp = try connectPrivateQMP(domainName: domainName, timeout: timeout, peer: qemuPeer(connection: connection, domain: domain))
        var nics: [GuestNIC] = []
        var disk: ReplicatedDisk?
        do throws(GeminusError) {
            // Each held interface's QEMU end listens on loopback; its frames are the guest's
            // output from the first epoch on.
            nics = try LibvirtNICs.open(xml: live)
            try LibvirtNICs.awaitConnected(nics, domainName: domainName, timeout: timeout)
            disk = try LibvirtDisk.open(xml: live, qmp: qmp, domainName: domainName, qemuPID: connection.qemuPid(of: domain))
            let definedBytes = CAEnrollmentCheck(xml: live).facts.memoryKiB.map { Int($0) * 1024 }
            let (path, memory) = try mapRAM(qmp: qmp, domainName: domainName, expectedBytes: definedBytes)
            let finder = try dirtyPages.makeFinder(qemuPID: connection.qemuPid(of: domain), ramFilePath: path, fallback: fallback)
            return try LibvirtGuest(connection: connection, domain: domain, qmp: qmp, memory: memory, ramFilePath: path,
                                    counterAddress: counterAddress, finder: finder, nics: nics, disk: disk)
        } catch {
            disk?.stop()
            for n in nics { n.stop() }
            qmp.close()
            throw error
        }
    }

    /// Connects to the domain's private QMP socket, served by `peer` (`qemuPeer`).
    static func connectPrivateQMP(domainName: String, timeout: Double, peer: SocketPeer) throws(GeminusError) -> QMPClient {
        let socket = PrivateQMP.socketPath(domain: domainName)
        do throws(GeminusError) {
            return try QMPClient(socketPath: socket, connectTimeout: timeout, peer: peer)
        } catch {
            var e = error
            if e.code != .connectionFailed || !e.message.contains("refusing") {
                e.fix = "the domain needs its private QMP socket: `geminus enroll \(domainName) --prepare`, then restart the domain"
            }
            throw e
        }
    }

    /// Who must be behind a domain's private QMP socket: its QEMU by pid when libvirt's pid file
    /// names it, else a process of the user libvirt runs QEMU as (review M9).
    static func qemuPeer(connection: LibvirtConnection, domain: LibvirtDomain) throws(GeminusError) -> SocketPeer {
        if let pid = connection.qemuPid(of: domain) { return .process(pid) }
        return .user(try LibvirtQEMUConf.read().qemuUser().uid)
    }

    /// Asks QEMU where guest RAM lives (the path has libvirt's per-start id in it) and maps it.
    /// The path comes from the QMP peer, and the agent (root) writes replicas into it, so only a
    /// regular file under libvirt's memory backing directory is opened, without following a
    /// link at its end, and of the domain's defined size (`expectedBytes`) when known (M9).
    static func mapRAM(qmp: QMPClient, domainName: String, expectedBytes: Int?,
                       conf: LibvirtQEMUConf = .read()) throws(GeminusError) -> (String, PageMemory) {
        let reply = try qmp.execute("qom-get", arguments: ["path": "/objects/pc.ram", "property": "mem-path"])
        guard let path = reply as? String, !path.isEmpty else {
            throw GeminusError(.invalidArgument, "domain '\(domainName)' has no file-backed RAM (/objects/pc.ram mem-path: \(reply))",
                               fix: "`geminus enroll \(domainName) --prepare` sets <memoryBacking><source type='file'/><access mode='shared'/>")
        }
        let fd = try openRAMFile(path, domainName: domainName, expectedBytes: expectedBytes, conf: conf)
        defer { close(fd) }
        var st = stat()
        _ = fstat(fd, &st)
        // Mapped through the descriptor just checked, not the path again.
        return (path, try PageMemory(fileAt: "/proc/self/fd/\(fd)", pageCount: Int(st.st_size) / GuestPage.size, create: false))
    }

    /// Opens a RAM file QEMU named, read-write, after the checks of `mapRAM`.
    static func openRAMFile(_ path: String, domainName: String, expectedBytes: Int?, conf: LibvirtQEMUConf) throws(GeminusError) -> Int32 {
        let base = conf.memoryBackingDirectory
        let fix = "libvirt puts RAM files under memory_backing_dir (\(LibvirtQEMUConf.path)); restart the domain so that it runs its enrolled definition"
        guard let resolvedBase = realpath(base, nil) else {
            throw GeminusError(.io, "cannot resolve libvirt's memory backing directory \(base): \(String(cString: strerror(errno)))", fix: fix)
        }
        defer { free(resolvedBase) }
        guard let resolvedC = realpath(path, nil) else {
            throw GeminusError(.io, "cannot resolve the RAM file \(path) of '\(domainName)': \(String(cString: strerror(errno)))",
                               fix: "run the agent as root on the domain's host")
        }
        let resolved = String(cString: resolvedC)
        free(resolvedC)
        let prefix = String(cString: resolvedBase) + "/"
        guard resolved.hasPrefix(prefix) else {
            throw GeminusError(.invalidArgument, "the RAM file QEMU names for '\(domainName)', \(path), is not under libvirt's memory backing directory \(base); refusing to write guest memory there", fix: fix)
        }
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            throw GeminusError(.io, e == ELOOP ? "the RAM file \(path) of '\(domainName)' is a symbolic link; refusing to follow it"
                                              : "cannot open the RAM file \(path) of '\(domainName)': \(String(cString: strerror(e)))",
                               fix: e == ELOOP ? fix : "run the agent as root on the domain's host")
        }
        var st = stat()
        let size = fstat(fd, &st) == 0 && st.st_mode & S_IFMT == S_IFREG ? Int(st.st_size) : -1
        let problem: String? = if size < 0 {
            "is not a regular file"
        } else if size == 0 || size % GuestPage.size != 0 {
            "has \(size) bytes, not a whole number of pages"
        } else if let expectedBytes, size != expectedBytes {
            "has \(size) bytes, the domain is defined with \(expectedBytes)"
        } else {
            nil
        }
        if let problem {
            close(fd)
            throw GeminusError(.hypervisor, "the RAM file \(resolved) of '\(domainName)' \(problem); refusing to map it", fix: fix)
        }
        return fd
    }

    public var qmp: QMPClient { checkpointer.qmp }
    public var memory: PageMemory { checkpointer.memory }
    public var qemuPID: Int32? { pid }
    public var ramFilePath: String { ramPath }
    public var lastTimings: CaptureTimings? { checkpointer.lastTimings }
    public var pageCount: Int { memory.pageCount }
    public var progressCounter: UInt64 { counterAddress.map { memory.loadU64(at: $0) } ?? 0 }
    public var lastCaptureParts: CaptureParts? { checkpointer.lastCaptureParts }
    public var statusReport: [String: String] {
        var r = checkpointer.dirtyPageReport.merging(["guest": "libvirt", "domain": domainName]) { _, new in new }
        if !nics.isEmpty { r["nic"] = nics.map(\.statusLine).joined(separator: "; ") }
        if let disk { r["disk"] = disk.statusLine }
        return r
    }

    /// Pauses, then takes the NIC frames sent before the pause (`drain`), so that they belong
    /// to the epoch being captured.
    public func pause() throws(GeminusError) {
        try checkpointer.pause()
        drainOutput()
    }

    public func drainOutput() {
        for n in nics { n.drain() }
    }

    /// The NICs' frames go to `port` from now on (held there until their epoch is acknowledged).
    public func attachOutput(_ port: any GuestOutputPort) {
        for n in nics { n.attach(port) }
    }

    /// A NIC's frames wait for room in the output port: the agent keeps the guest paused until
    /// acknowledgements make room (as for a QEMU the agent starts).
    public var outputStalled: Bool { nics.contains { $0.isStalled } }

    public var inboundFrames: (@Sendable ([UInt8]) -> Void)? { LibvirtNICs.inbound(nics) }

    public func resume() throws(GeminusError) { try checkpointer.resume() }
    public func capture(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        try checkpointer.capture(full: full, into: buffer)
        try disk?.capture(full: full, into: buffer, qmp: qmp)
    }

    /// Handover: the guest must not run here again. virDomainDestroy (which also ends a
    /// paused QEMU), then QMP is closed. Idempotent.
    public func shutdown() {
        guard markReleased() else { return }
        for n in nics { n.stop() }
        disk?.stop()
        qmp.close()
        if (try? connection.destroy(domain)) == nil, let pid {
            // libvirt did not answer: make sure this QEMU cannot run on.
            if (try? connection.isActive(domain)) != false { kill(pid, SIGKILL) }
        }
    }

    /// Its QEMU has exited (or is a zombie), or libvirt says the domain is not active.
    public var stoppedForGood: Bool {
        if let pid {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
            return stat.split(separator: ")").last?.split(separator: " ").first == "Z"
        }
        return (try? connection.isActive(domain)) == false
    }

    /// Leaves the domain running (unprotected): `cont` if the agent paused it, the fdset
    /// removed, QMP closed. Idempotent.
    public func detach() {
        guard markReleased() else { return }
        // QEMU listens again once the agent's connection closes; the guest's frames then go
        // nowhere until an agent connects (the domain is left running, unprotected).
        for n in nics { n.stop() }
        // No guest write may wait for an export that is going away.
        disk?.detach(qmp)
        if checkpointer.isPaused { try? checkpointer.resume() }
        deviceStateFD.unregister(from: qmp)
        qmp.close()
    }

    /// SIGKILL to the QEMU process: a host crash, for tests.
    public func crash() {
        if let pid { kill(pid, SIGKILL) }
    }

    private func markReleased() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if released { return false }
        released = true
        return true
    }
}
