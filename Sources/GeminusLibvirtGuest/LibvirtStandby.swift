import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusLibvirt
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// The secondary's hot standby as a libvirt domain. `domainName` is this host's definition of
/// the protected VM (persistent, inactive). `makeReplicaMemory` starts it paused through
/// libvirt with `-incoming defer`; its own RAM file is the replica (written in place while it
/// waits); failover loads the committed device state over `fd:` and `cont`s.
///
/// Found on libvirt 9.0: `virDomainCreateXML(START_PAUSED)` with the persistent definition's
/// XML (same name and uuid) plus the extra `<qemu:commandline>` arguments starts the inactive
/// persistent domain with that XML as its live definition and leaves the persistent
/// definition unchanged (`virsh dumpxml --inactive` identical before and after). libvirt
/// reports it "paused (user)"; after our `cont` on the private socket, "running (unpaused)".
public final class LibvirtStandby: StandbyHost, @unchecked Sendable {
    public let connection: LibvirtConnection
    public let domainName: String
    /// Where the guest keeps its progress counter (nil: it keeps none).
    public let counterAddress: Int?
    /// Bound on each libvirt call and on connecting QMP (seconds).
    public let timeout: Double

    private let lock = NSLock()
    private var domain: LibvirtDomain?
    private var qmp: QMPClient?
    private var pid: Int32?
    private var ramPath = ""
    private var started = false
    private var resumed = false
    private var _lastResume: ResumeTimings?
    /// The standby QEMU's held NICs, connected while it waits; handed to the resumed guest.
    private var nics: [GuestNIC] = []
    /// The XML the waiting standby was started with (its disk is the replica's image).
    private var standbyXML: String?
    /// A qcow2 replica's writer (a qemu-storage-daemon holding the image): released before
    /// the standby QEMU resumes, or when this standby is stopped or replaced.
    private var daemonDisk: StorageDaemonReplicaDisk?
    private let definedPages: Int?
    /// From this host's definition; compared with the primary's at the handshake.
    public let platform: GuestPlatform

    /// How the guest resumed here finds its dirty pages when it becomes the protected one.
    public let dirtyPages: DirtyPagePolicy
    /// Told why write tracking could not be had for the resumed guest (`.auto` only).
    public let trackingFallback: @Sendable (GeminusError) -> Void

    public init(connection: LibvirtConnection, domainName: String, counterAddress: Int?,
                dirtyPages: DirtyPagePolicy = .compare, trackingFallback: @escaping @Sendable (GeminusError) -> Void = { _ in }) {
        self.connection = connection
        self.dirtyPages = dirtyPages
        self.trackingFallback = trackingFallback
        self.domainName = domainName
        self.counterAddress = counterAddress
        self.timeout = 30
        let xml = (try? connection.lookupDomain(named: domainName)).flatMap { try? connection.xml(of: $0, .persistent) }
        if let xml, let kib = CAEnrollmentCheck(xml: xml).facts.memoryKiB {
            definedPages = Int(kib * 1024) / GuestPage.size
        } else {
            definedPages = nil
        }
        platform = xml.map { LibvirtPlatform.of(xml: $0, connection: connection) } ?? GuestPlatform()
    }

    /// From the definition's <memory> (nil when the definition could not be read).
    public var expectedPageCount: Int? { definedPages }
    public var lastResumeTimings: ResumeTimings? { lock.lock(); defer { lock.unlock() }; return _lastResume }
    /// The waiting standby QEMU's pid (before resume).
    public var standbyPID: Int32? { lock.lock(); defer { lock.unlock() }; return resumed ? nil : pid }

    /// The standby domain is active and paused, and its private QMP answers.
    public var isStandbyReady: Bool {
        lock.lock()
        defer { lock.unlock() }
        guard !resumed, let domain, let qmp, qmp.state != .closed,
              (try? connection.state(of: domain, timeout: 2))?.state == .paused,
              let status = try? qmp.execute("query-status", timeout: 1) as? [String: Any] else { return false }
        return status["running"] as? Bool == false
    }

    public func checkHealth() -> [String: String] {
        var report = ["guest": "libvirt", "domain": domainName]
        let (waiting, resumedAlready) = lock.withLock { (started, resumed) }
        report["standby"] = resumedAlready ? "resumed" : !waiting ? "not started (starts with the first full checkpoint)"
            : isStandbyReady ? "ready" : "DOWN (the paused standby domain or its QMP socket does not answer)"
        return report
    }

    /// The standby's live XML: the persistent definition plus `-incoming defer`, no
    /// configuration section in the stream (the primary sends none) and the private QMP socket.
    public static func standbyXML(definition: String, domainName: String) throws -> String {
        try CAEnrollmentCheck.addingQEMUArguments(definition, [
            PrivateQMP.arguments(domain: domainName),
            ["-incoming", "defer"],
            ["-global", "migration.send-configuration=off"],
        ])
    }

    public func makeReplicaMemory(pageCount: Int) throws(GeminusError) -> PageMemory {
        lock.lock()
        defer { lock.unlock() }
        guard !resumed else { throw GeminusError(.internalInvariant, "this standby has already resumed its guest") }
        if let expected = definedPages, expected != pageCount {
            throw GeminusError(.invalidArgument, "the replica has \(pageCount) pages but domain '\(domainName)' is defined with \(expected)")
        }
        stopLocked()
        try PrivateQMP.ensureDirectory()
        let d = try libvirt { try connection.lookupDomain(named: domainName, timeout: timeout) }
        if try libvirt({ try connection.isActive(d, timeout: timeout) }) {
            throw GeminusError(.invalidArgument, "standby domain '\(domainName)' is already running on this host",
                               fix: "a standby starts from an inactive definition: `virsh destroy \(domainName)` if it is a leftover")
        }
        let definition = try libvirt { try connection.xml(of: d, .persistent, timeout: timeout) }
        // Held NICs: this QEMU listens on free loopback ports of its own (the primary's may be
        // taken on this host), and the agent connects to them while it waits.
        let xml = try libvirt {
            try HeldInterfaces.rebindingPorts(inDomainXML: try Self.standbyXML(definition: definition, domainName: domainName)) { held in
                LibvirtNICs.freePort() ?? held.port
            }
        }
        unlink(PrivateQMP.socketPath(domain: domainName))
        let live = try libvirt { try connection.createTransient(xml: xml, paused: true, timeout: timeout) }
        domain = live
        standbyXML = xml
        started = true
        do throws(GeminusError) {
            pid = connection.qemuPid(of: live)
            let q = try LibvirtGuest.connectPrivateQMP(domainName: domainName, timeout: timeout,
                                                       peer: try LibvirtGuest.qemuPeer(connection: connection, domain: live))
            qmp = q
            try IncomingMigration.enableIgnoreShared(q)
            nics = try LibvirtNICs.open(xml: xml)
            let (path, memory) = try LibvirtGuest.mapRAM(qmp: q, domainName: domainName, expectedBytes: pageCount * GuestPage.size)
            ramPath = path
            guard memory.pageCount == pageCount else {
                throw GeminusError(.invalidArgument, "the standby's RAM file \(path) has \(memory.pageCount) pages, the replica \(pageCount)")
            }
            // Every page reserved now, before the first replica write: the first write to fresh
            // tmpfs pages is slow (DESIGN.md), and on a full tmpfs it would be a SIGBUS mid-commit.
            try Self.reserveRAM(path: path, bytes: memory.byteCount)
            return memory
        } catch {
            stopLocked()
            throw error
        }
    }

    /// The standby domain's writable disk (its own image on this host): the replica's commits
    /// are written there while the standby QEMU waits with it open (`-incoming` reads nothing
    /// until the migration completes, and a raw image keeps no cache in QEMU).
    ///
    /// A qcow2 image is written through a qemu-storage-daemon instead (its bytes are not at the
    /// guest's offsets); the standby QEMU, inactive while it waits, takes no lock on the image,
    /// so the daemon can open it writable, and re-reads the qcow2 metadata when it activates.
    public func makeReplicaDisk() throws(GeminusError) -> (any ReplicaDisk)? {
        let xml = lock.withLock { () -> String? in
            // One writer per image: an earlier replica disk of this standby lets go first.
            daemonDisk?.release()
            daemonDisk = nil
            return standbyXML
        }
        guard let xml else {
            throw GeminusError(.internalInvariant, "the replica disk is opened after the standby starts (makeReplicaMemory)")
        }
        // Not under the lock: starting a daemon takes tens of milliseconds.
        let disk = try LibvirtDisk.replica(definition: xml, domainName: domainName)
        lock.withLock { daemonDisk = disk as? StorageDaemonReplicaDisk }
        return disk
    }

    public func resume(memory: PageMemory, deviceState: [UInt8], output: any GuestOutputPort) throws(GeminusError) -> any ProtectedGuest {
        try resumeGuest(memory: memory, deviceState: deviceState, output: output)
    }

    /// Reserves the standby's RAM file (QEMU created it; opened without following a link).
    static func reserveRAM(path: String, bytes: Int) throws(GeminusError) {
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            throw GeminusError(.io, "cannot open the standby's RAM file \(path) to reserve it: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        try QEMUStandby.reserve(fd: fd, bytes: bytes, path: path)
    }

    /// `resume` with the concrete type. The held NICs' frames go to `output` from the resume on
    /// (the announce-self RARPs first).
    public func resumeGuest(memory: PageMemory, deviceState: [UInt8], output: (any GuestOutputPort)? = nil,
                            migrationTimeout: Double = 10) throws(GeminusError) -> LibvirtGuest {
        lock.lock()
        defer { lock.unlock() }
        guard !resumed else { throw GeminusError(.internalInvariant, "this standby has already resumed its guest") }
        guard let domain, let qmp else {
            throw GeminusError(.internalInvariant, "no standby domain waiting: makeReplicaMemory starts it")
        }
        guard !deviceState.isEmpty else { throw GeminusError(.invalidArgument, "no committed device state to resume from") }
        var t = ResumeTimings()
        t.hot = true
        var t0 = Monotonic.nanos()
        // The qcow2 replica's daemon flushes and exits before the migration starts: QEMU
        // activates the image (its write lock, its qcow2 metadata read afresh) as the incoming
        // migration completes, and must find it whole and free.
        if let d = daemonDisk {
            switch d.release() {
            case .success(let nanos): t.releaseDiskNanos = nanos
            case .failure(let e): throw GeminusError(.io, "the replica disk could not be handed to the standby: \(e.message)", fix: e.fix)
            }
            daemonDisk = nil
        }
        t0 = Monotonic.nanos()
        var readEnd = try IncomingMigration.pipe(holding: deviceState)
        defer { if readEnd >= 0 { close(readEnd) } }
        t.writeStateNanos = Monotonic.nanos() - t0
        do throws(GeminusError) {
            // `fd:` and not `exec:`: libvirt runs QEMU with -sandbox spawn=deny, and an exec:
            // URI kills it.
            t0 = Monotonic.nanos()
            try IncomingMigration.startFromPipe(qmp, readEnd: readEnd)
            close(readEnd)
            readEnd = -1
            t.incomingCommandNanos = Monotonic.nanos() - t0
            t.polls = try IncomingMigration.waitCompleted(qmp, timeout: migrationTimeout)
            t.loadNanos = Monotonic.nanos() - t0
            t0 = Monotonic.nanos()
            // The NICs carry the resumed guest's frames from its first instruction on (a NIC not
            // connected yet loses the frames QEMU sends until it is: lost, never released early).
            for n in nics { _ = n.waitConnected(timeout: 2) }
            if let output { for n in nics { n.attach(output) } }
            t.contRetries = try IncomingMigration.contRetrying(qmp)
            t.contNanos = Monotonic.nanos() - t0
            // Switches learn the guest's MACs on this host (best effort: no NIC, no packets).
            t0 = Monotonic.nanos()
            _ = try? qmp.execute("announce-self", arguments: ["initial": 50, "max": 550, "rounds": 5, "step": 100])
            t.announceNanos = Monotonic.nanos() - t0
        } catch {
            var e = error
            if (try? connection.isActive(domain, timeout: 2)) == false { e.message += " (the standby QEMU has exited)" }
            throw e
        }
        // The finder after `cont`: taking QEMU's userfaultfd and registering its RAM costs
        // milliseconds that need not delay the resume; the first capture is full anyway.
        let finder = dirtyPages.makeFinderForResumedGuest(qemuPID: pid, ramFilePath: ramPath, fallback: trackingFallback)
        // Its disk's mirror, for re-protection (after `cont`: nothing here delays the resume).
        // Without it the guest still runs; a secondary with the disk refuses its epochs.
        let disk = standbyXML.flatMap { try? LibvirtDisk.open(xml: $0, qmp: qmp, domainName: domainName, qemuPID: pid) }
        let guest = try LibvirtGuest(connection: connection, domain: domain, qmp: qmp, memory: memory,
                                     ramFilePath: ramPath,
                                     counterAddress: counterAddress, finder: finder, platform: platform.isEmpty ? nil : platform, nics: nics,
                                     disk: disk)
        guest.resumeTimings = t
        nics = []
        resumed = true
        _lastResume = t
        self.qmp = nil
        self.domain = nil
        return guest
    }

    /// Destroys a waiting (not resumed) standby; the persistent definition stays. Idempotent.
    public func cleanup() {
        lock.lock()
        defer { lock.unlock() }
        stopLocked()
    }

    private func stopLocked() {
        daemonDisk?.release()
        daemonDisk = nil
        for n in nics { n.stop() }
        nics = []
        qmp?.close()
        qmp = nil
        if !resumed, started {
            if let d = domain ?? (try? connection.lookupDomain(named: domainName)),
               (try? connection.isActive(d)) == true {
                if (try? connection.destroy(d)) == nil, let pid { kill(pid, SIGKILL) }
            }
            started = false
        }
        domain = nil
        pid = nil
        standbyXML = nil
    }
}
