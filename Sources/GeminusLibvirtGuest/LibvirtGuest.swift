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
        let qmp = try connectPrivateQMP(domainName: domainName, timeout: timeout)
        var nics: [GuestNIC] = []
        var disk: ReplicatedDisk?
        do throws(GeminusError) {
            // Each held interface's QEMU end listens on loopback; its frames are the guest's
            // output from the first epoch on.
            nics = try LibvirtNICs.open(xml: live)
            try LibvirtNICs.awaitConnected(nics, domainName: domainName, timeout: timeout)
            disk = try LibvirtDisk.open(xml: live, qmp: qmp, domainName: domainName)
            let (path, memory) = try mapRAM(qmp: qmp, domainName: domainName, create: false)
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

    static func connectPrivateQMP(domainName: String, timeout: Double) throws(GeminusError) -> QMPClient {
        let socket = PrivateQMP.socketPath(domain: domainName)
        do throws(GeminusError) {
            return try QMPClient(socketPath: socket, connectTimeout: timeout)
        } catch {
            var e = error
            e.fix = "the domain needs its private QMP socket: `geminus enroll \(domainName) --prepare`, then restart the domain"
            throw e
        }
    }

    /// Asks QEMU where guest RAM lives (the path has libvirt's per-start id in it) and maps it.
    static func mapRAM(qmp: QMPClient, domainName: String, create: Bool) throws(GeminusError) -> (String, PageMemory) {
        let reply = try qmp.execute("qom-get", arguments: ["path": "/objects/pc.ram", "property": "mem-path"])
        guard let path = reply as? String, !path.isEmpty else {
            throw GeminusError(.invalidArgument, "domain '\(domainName)' has no file-backed RAM (/objects/pc.ram mem-path: \(reply))",
                               fix: "`geminus enroll \(domainName) --prepare` sets <memoryBacking><source type='file'/><access mode='shared'/>")
        }
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw GeminusError(.io, "cannot stat the RAM file \(path) of '\(domainName)': \(String(cString: strerror(errno)))",
                               fix: "run the agent as root on the domain's host")
        }
        let pages = Int(st.st_size) / GuestPage.size
        guard pages > 0 else { throw GeminusError(.hypervisor, "the RAM file \(path) of '\(domainName)' is empty") }
        return (path, try PageMemory(fileAt: path, pageCount: pages, create: create))
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
