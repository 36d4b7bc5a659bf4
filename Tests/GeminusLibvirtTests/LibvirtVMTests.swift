import Foundation
import Testing
import GeminusCore
@testable import GeminusLibvirt
import GeminusLibvirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// Gate for tests that need a running libvirtd. An unreachable daemon fails them with the
/// commands that start one, unless GEMINUS_SKIP_VM_TESTS=1, which skips them with the reason.
enum LibvirtEnv {
    /// qemu:///system unless GEMINUS_LIBVIRT_TEST_URI names another daemon.
    static let uri = ProcessInfo.processInfo.environment["GEMINUS_LIBVIRT_TEST_URI"] ?? LibvirtConnection.defaultURI
    static let skipRequested = ProcessInfo.processInfo.environment["GEMINUS_SKIP_VM_TESTS"] == "1"
    static let startHint = "install and start libvirt: `apt-get install -y --no-install-recommends libvirt-daemon-system libvirt-clients`, `mkdir -p /dev/shm/vmram`, add `memory_backing_dir = \"/dev/shm/vmram\"` to /etc/libvirt/qemu.conf, then `virtlogd -d; libvirtd -d` (no systemd); or set GEMINUS_SKIP_VM_TESTS=1 to skip the libvirt tests"

    /// Whether libvirtd answered once at the start (nil) or why not.
    static let probe: GeminusError? = {
        warnAboutKVMNode()
        do {
            let c = try LibvirtConnection.open(uri: uri, timeout: 30)
            try c.close()
            return nil
        } catch let e as GeminusError {
            return e
        } catch {
            return GeminusError(.hypervisor, "\(error)")
        }
    }()

    /// A /dev/kvm that QEMU's user cannot open (root:root 0600, no udev) makes libvirt 9.0
    /// throw away its cached QEMU capabilities on every define/start ("KVM was enabled when
    /// probing, but it is not available now") and re-probe: 40 s per call instead of 10 ms.
    static func warnAboutKVMNode() {
        var st = stat()
        guard stat("/dev/kvm", &st) == 0, st.st_mode & 0o060 != 0o060 else { return }
        FileHandle.standardError.write(Data("""
            note: /dev/kvm is not group read-writable, so libvirtd re-probes QEMU on every define/start (about 40 s each); \
            `chgrp kvm /dev/kvm; chmod 0660 /dev/kvm` (what Debian's udev rule does) makes the libvirt tests fast\n
            """.utf8))
    }

    static var enabled: Bool { probe == nil || !skipRequested }
    static let skipReason = Comment(rawValue: "libvirtd is not reachable at \(uri) and GEMINUS_SKIP_VM_TESTS=1: libvirt tests skipped")

    /// A fresh connection, or nil after recording how to start libvirtd.
    static func connect(sourceLocation: SourceLocation = #_sourceLocation) -> LibvirtConnection? {
        if let e = probe {
            Issue.record("libvirtd is not reachable at \(uri) (\(e.message)): \(startHint)", sourceLocation: sourceLocation)
            return nil
        }
        do {
            // QEMU (libvirt-qemu) creates the test domains' private QMP sockets there.
            try PrivateQMP.ensureDirectory()
            return try LibvirtConnection.open(uri: uri, timeout: 60)
        } catch {
            Issue.record("cannot connect to \(uri): \(error); \(startHint)", sourceLocation: sourceLocation)
            return nil
        }
    }

    static let repoRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    /// Per-process directory for the guest kernel and serial logs; the QEMU user must be able
    /// to reach it (libvirt relabels the files themselves, not their directories).
    static let workDirectory: String = {
        let dir = "/tmp/geminus-libvirt-tests-\(getpid())"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                 attributes: [.posixPermissions: 0o755])
        atexit { _ = try? FileManager.default.removeItem(atPath: "/tmp/geminus-libvirt-tests-\(getpid())") }
        return dir
    }()

    /// Builds Tools/guest-tiny once per test process.
    static let guestELF: Result<String, GeminusError> = {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [repoRoot + "/Tools/guest-tiny/build.sh", workDirectory + "/guest"]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        do { try p.run() } catch { return .failure(GeminusError(.io, "cannot run build.sh: \(error)")) }
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let path = String(decoding: o, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard p.terminationStatus == 0, FileManager.default.fileExists(atPath: path) else {
            return .failure(GeminusError(.io, "Tools/guest-tiny/build.sh failed: \(String(decoding: e, as: UTF8.self))"))
        }
        _ = chmod(workDirectory + "/guest", 0o755)
        return .success(path)
    }()

    nonisolated(unsafe) private static var serial = 0
    private static let serialLock = NSLock()

    static func uniqueName(_ role: String) -> String {
        serialLock.withLock {
            serial += 1
            return "geminus-test-\(role)-\(getpid())-\(serial)"
        }
    }

    /// The tiny guest as a CA-ready domain (TCG, 32 MiB, shared file RAM, no balloon, serial to
    /// a file, the agent's private QMP socket).
    static func domainXML(name: String, kernel: String, serialPath: String, pages: Int = 8) -> String {
        """
        <domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
          <name>\(name)</name>
          <memory unit='MiB'>32</memory>
          <vcpu>1</vcpu>
          <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
          <os>
            <type arch='x86_64' machine='pc'>hvm</type>
            <kernel>\(kernel)</kernel>
            <cmdline>pages=\(pages)</cmdline>
          </os>
          <devices>
            <serial type='file'><source path='\(serialPath)'/><target port='0'/></serial>
            <memballoon model='none'/>
          </devices>
          <qemu:commandline>
            <qemu:arg value='-qmp'/>
            <qemu:arg value='unix:\(PrivateQMP.socketPath(domain: name)),server=on,wait=off'/>
          </qemu:commandline>
        </domain>
        """
    }

    /// Destroys and undefines the test domain `name` if it exists; never throws. Only names
    /// made by `uniqueName` (prefix geminus-test-) are ever passed here.
    static func cleanUp(_ conn: LibvirtConnection, _ name: String) {
        precondition(name.hasPrefix("geminus-test-"))
        defer { unlink(PrivateQMP.socketPath(domain: name)) }
        guard let d = try? conn.lookupDomain(named: name) else { return }
        if (try? conn.isActive(d)) == true { try? conn.destroy(d) }
        if (try? conn.isPersistent(d)) == true { try? conn.undefine(d) }
    }
}

/// Times one call and reports it on stderr as `libvirt-timing NAME MS`.
func timed<T>(_ name: String, _ body: () throws -> T) rethrows -> T {
    let start = ContinuousClock.now
    defer {
        let d = ContinuousClock.now - start
        let ms = Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
        FileHandle.standardError.write(Data("libvirt-timing \(name) \(String(format: "%.1f", ms)) ms\n".utf8))
    }
    return try body()
}

@Suite(.serialized, .enabled(if: LibvirtEnv.enabled, LibvirtEnv.skipReason))
struct LibvirtVMTests {
    @Test func persistentTinyGuestLifecycle() throws {
        guard let conn = LibvirtEnv.connect() else { return }
        let kernel: String
        switch LibvirtEnv.guestELF {
        case .success(let p): kernel = p
        case .failure(let e): Issue.record("cannot build the tiny guest: \(e)"); return
        }
        let name = LibvirtEnv.uniqueName("lv")
        let serialPath = LibvirtEnv.workDirectory + "/\(name).serial"
        let xml = LibvirtEnv.domainXML(name: name, kernel: kernel, serialPath: serialPath)
        #expect(CAEnrollmentCheck(xml: xml).problems == [])
        defer {
            LibvirtEnv.cleanUp(conn, name)
            try? conn.close()
        }

        let domain = try timed("virDomainDefineXMLFlags") { try conn.defineDomain(xml: xml) }
        #expect(domain.name == name)
        #expect(domain.uuid.count == 36)
        #expect(try conn.isPersistent(domain))
        #expect(try timed("virDomainGetState(shut off)") { try conn.state(of: domain) }.state == .shutOff)
        #expect(conn.qemuPid(of: domain) == nil)

        // libvirt's persistent XML still passes, and names the expanded machine type.
        let persistent = try timed("virDomainGetXMLDesc(inactive)") { try conn.xml(of: domain, .persistent) }
        let check = CAEnrollmentCheck(xml: persistent)
        #expect(check.problems == [])
        #expect(check.facts.machineType?.hasPrefix("pc-i440fx-") == true)
        #expect(check.facts.memoryKiB == 32 * 1024)
        #expect(check.facts.vcpus == 1)
        #expect(check.facts.emulator != nil)

        try timed("virDomainCreateWithFlags") { try conn.start(domain) }
        #expect(try conn.state(of: domain).state == .running)
        #expect(try conn.isActive(domain))

        // The guest boots and prints its banner.
        let deadline = ContinuousClock.now + .seconds(20)
        var serialText = ""
        while ContinuousClock.now < deadline {
            serialText = (try? String(contentsOfFile: serialPath, encoding: .utf8)) ?? ""
            if serialText.contains("geminus-tiny:") { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        #expect(serialText.contains("geminus-tiny: boot_marker="), "serial log: \(serialText)")

        let live = try timed("virDomainGetXMLDesc(live)") { try conn.xml(of: domain, .live) }
        #expect(live.contains("<domain type='qemu' id='"))
        #expect(CAEnrollmentCheck(xml: live).problems == [])

        if let pid = conn.qemuPid(of: domain) {
            #expect(FileManager.default.fileExists(atPath: "/proc/\(pid)"))
        } else if getuid() == 0 && LibvirtEnv.uri == LibvirtConnection.defaultURI {
            Issue.record("no QEMU pid for a running domain of the system daemon while running as root")
        }

        let status = try timed("virDomainQemuMonitorCommand(query-status)") {
            try conn.qemuMonitorCommand(domain, #"{"execute":"query-status"}"#)
        }
        #expect(status.contains(#""status":"running""#), "reply: \(status)")
        let bad = try conn.qemuMonitorCommand(domain, #"{"execute":"no-such-command"}"#)
        #expect(bad.contains(#""error""#), "reply: \(bad)")

        // Geminus enrollment metadata.
        #expect(try timed("virDomainGetMetadata(absent)") { try conn.readEnrollment(of: domain) } == nil)
        let enrollment = GeminusEnrollment(peer: "10.0.0.2:7400", intervalMilliseconds: 25, state: .enrolled)
        try timed("virDomainSetMetadata") { try conn.writeEnrollment(enrollment, of: domain) }
        #expect(try timed("virDomainGetMetadata") { try conn.readEnrollment(of: domain) } == enrollment)
        #expect(try GeminusEnrollment.find(inDomainXML: conn.xml(of: domain, .persistent)) == enrollment)
        #expect(try GeminusEnrollment.find(inDomainXML: conn.xml(of: domain, .live)) == enrollment)
        var updated = enrollment
        updated.state = .protected
        try conn.writeEnrollment(updated, of: domain)
        #expect(try conn.readEnrollment(of: domain) == updated)
        try timed("virDomainSetMetadata(remove)") { try conn.removeEnrollment(of: domain) }
        #expect(try conn.readEnrollment(of: domain) == nil)
        #expect(try GeminusEnrollment.find(inDomainXML: conn.xml(of: domain, .persistent)) == nil)
        try conn.removeEnrollment(of: domain)  // removing nothing is fine

        try timed("virDomainDestroy") { try conn.destroy(domain) }
        #expect(try conn.state(of: domain).state == .shutOff)
        try timed("virDomainUndefine") { try conn.undefine(domain) }
        #expect(throws: GeminusError.self) { try conn.lookupDomain(named: name) }
        #expect(conn.status == .open)
    }

    @Test func metadataPersistsWhileShutOff() throws {
        guard let conn = LibvirtEnv.connect() else { return }
        guard case .success(let kernel) = LibvirtEnv.guestELF else { Issue.record("cannot build the tiny guest"); return }
        let name = LibvirtEnv.uniqueName("md")
        defer {
            LibvirtEnv.cleanUp(conn, name)
            try? conn.close()
        }
        let domain = try conn.defineDomain(xml: LibvirtEnv.domainXML(name: name, kernel: kernel,
                                                                      serialPath: LibvirtEnv.workDirectory + "/\(name).serial"))
        let e = GeminusEnrollment(peer: "peer.example:7400", intervalMilliseconds: 50, state: .unprotected)
        try conn.writeEnrollment(e, of: domain)
        // A new connection and a new lookup see it.
        let other = try LibvirtConnection.open(uri: LibvirtEnv.uri)
        defer { try? other.close() }
        #expect(try other.readEnrollment(of: other.lookupDomain(named: name)) == e)
        try conn.removeEnrollment(of: domain)
        #expect(try other.readEnrollment(of: other.lookupDomain(named: name)) == nil)
    }

    /// A transient domain whose QEMU stops answering (SIGSTOP): a monitor call times out,
    /// names itself, and leaves the connection marked unknown; metadata lives in the live
    /// definition only.
    @Test func transientDomainAndHungMonitorTimesOut() throws {
        guard let conn = LibvirtEnv.connect() else { return }
        guard case .success(let kernel) = LibvirtEnv.guestELF else { Issue.record("cannot build the tiny guest"); return }
        let name = LibvirtEnv.uniqueName("tr")
        var stoppedPid: Int32?
        defer {
            if let stoppedPid { kill(stoppedPid, SIGCONT) }
            LibvirtEnv.cleanUp(conn, name)
            try? conn.close()
        }
        let xml = LibvirtEnv.domainXML(name: name, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(name).serial")
        let domain = try timed("virDomainCreateXML") { try conn.createTransient(xml: xml) }
        #expect(try conn.isPersistent(domain) == false)
        #expect(try conn.state(of: domain).state == .running)

        let e = GeminusEnrollment(peer: "10.0.0.3:7400", intervalMilliseconds: 25, state: .synchronizing)
        try conn.writeEnrollment(e, of: domain)
        #expect(try conn.readEnrollment(of: domain) == e)
        #expect(try GeminusEnrollment.find(inDomainXML: conn.xml(of: domain, .live)) == e)

        guard LibvirtEnv.uri == LibvirtConnection.defaultURI, let pid = conn.qemuPid(of: domain) else { return }
        #expect(kill(pid, SIGSTOP) == 0)
        stoppedPid = pid
        let start = ContinuousClock.now
        do {
            _ = try conn.qemuMonitorCommand(domain, #"{"execute":"query-status"}"#, timeout: 0.5)
            Issue.record("a monitor command to a stopped QEMU returned")
        } catch let err as GeminusError {
            #expect(err.code == .timeout)
            #expect(err.message.contains("virDomainQemuMonitorCommand(query-status) for '\(name)' on \(LibvirtEnv.uri)"), "\(err)")
            #expect(err.message.contains("500 ms"))
        }
        #expect(ContinuousClock.now - start < .seconds(3))
        #expect(conn.status == .unknown)
        kill(pid, SIGCONT)
        stoppedPid = nil
        // The connection still works once QEMU answers again; the status stays unknown until reconnecting.
        #expect(try conn.qemuMonitorCommand(domain, #"{"execute":"query-status"}"#, timeout: 30).contains("running"))
        #expect(conn.status == .unknown)
        try conn.destroy(domain)
        // A transient domain is gone once destroyed.
        #expect(throws: GeminusError.self) { try conn.lookupDomain(named: name) }
    }

    @Test func unknownDomainGivesTheOperatorMessage() throws {
        guard let conn = LibvirtEnv.connect() else { return }
        defer { try? conn.close() }
        let name = "geminus-test-no-such-domain-\(getpid())"
        do {
            _ = try timed("virDomainLookupByName(missing)") { try conn.lookupDomain(named: name) }
            Issue.record("found a domain that should not exist")
        } catch let e as GeminusError {
            #expect(e.code == .invalidArgument)
            let virsh = LibvirtEnv.uri == "qemu:///system" ? "virsh" : "virsh -c \(LibvirtEnv.uri)"
            #expect(e.description == "no domain named '\(name)' on \(LibvirtEnv.uri); `\(virsh) list --all` shows the defined ones")
        }
        #expect(conn.status == .open)
    }

    @Test func closedConnectionRefusesCalls() throws {
        guard let conn = LibvirtEnv.connect() else { return }
        try conn.close()
        #expect(conn.status == .closed)
        #expect(throws: GeminusError.self) { try conn.lookupDomain(named: "geminus-test-x") }
        try conn.close()  // twice is fine
    }
}
