import Foundation
import GeminusCore
import GeminusLibvirt
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// Two libvirt definitions of the tiny test guest, as the two hosts of a pair would hold them:
/// the protected VM's (started by `startPrimary`) and the standby's (on one machine they cannot
/// share a name; on two hosts they would be one name). Both are made CA-ready by the same
/// rules as `geminus enroll --prepare`. For the demo and the tests that run a real pair.
public final class TestGuestDomains: @unchecked Sendable {
    public let connection: LibvirtConnection
    public let primary: String
    public let standby: String

    /// `prefix` names both domains (`PREFIX-a-PID`, `PREFIX-b-PID`); `directory` receives the
    /// guest's copy and serial logs and must be readable by libvirt's QEMU user. With `nics`, the
    /// guest gets an NE2000 (ne2k_isa) per entry, the first at I/O 0x300 (the one the tiny guest
    /// drives), the next at 0x320, 0x340, ... (QEMU's own: it announces their MACs after a
    /// takeover), each with the same MAC in both definitions and attached to its bridge, which
    /// `prepare` moves to the agent's socket as `enroll --prepare` does.
    public init(uri: String, prefix: String, directory: URL, kernel: String, append: String, ramMiB: Int,
                nics: [(bridge: String, mac: String)] = []) throws {
        connection = try LibvirtConnection.open(uri: uri)
        let tag = "\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        primary = "\(prefix)-a-\(tag)"
        standby = "\(prefix)-b-\(tag)"
        try PrivateQMP.ensureDirectory()
        // QEMU runs as libvirt's unprivileged user: the kernel and serial logs must be where it
        // can read and write them.
        _ = chmod(directory.path, 0o755)
        let guest = directory.appendingPathComponent("guest.elf").path
        try FileManager.default.copyItem(atPath: kernel, toPath: guest)
        _ = chmod(guest, 0o644)
        for name in [primary, standby] {
            let serial = directory.appendingPathComponent("\(name).serial").path
            let interface = nics.enumerated().map { (n, nic) in
                "<interface type='bridge'><mac address='\(nic.mac)'/><source bridge='\(nic.bridge)'/><model type='ne2k_isa'/><address type='isa' iobase='\(String(format: "0x%x", 0x300 + 0x20 * n))' irq='\(String(format: "0x%x", 9 + n))'/></interface>"
            }.joined()
            let plain = """
                <domain type='qemu'>
                  <name>\(name)</name>
                  <memory unit='MiB'>\(ramMiB)</memory>
                  <vcpu>1</vcpu>
                  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>\(guest)</kernel><cmdline>\(append)</cmdline></os>
                  <devices><serial type='file'><source path='\(serial)'/><target port='0'/></serial>\(interface)</devices>
                </domain>
                """
            // With the write-tracking library when it is built, as `enroll --prepare` does.
            let ready = try CAEnrollmentCheck.prepare(plain, writeTrackingLibrary: WriteTrackingPreload.locate())
            let check = CAEnrollmentCheck(xml: ready)
            guard check.canProtect else {
                throw GeminusError(.internalInvariant, "the test guest's domain is not CA-ready: \(check.problems.map(\.description).joined(separator: "; "))")
            }
            let domain = try connection.defineDomain(xml: ready)
            // As `geminus enroll` records it (the peer is this machine: both "hosts" are here).
            try connection.writeEnrollment(GeminusEnrollment(peer: "127.0.0.1:7400", intervalMilliseconds: 25, state: .enrolled), of: domain)
        }
    }

    public func startPrimary() throws {
        try connection.start(try connection.lookupDomain(named: primary))
    }

    /// libvirt's word for the domain's state ("running", "paused", "shut off", ...).
    public func state(of name: String) -> String {
        guard let d = try? connection.lookupDomain(named: name), let s = try? connection.state(of: d) else { return "unknown" }
        return "\(s.state)"
    }

    /// Polls libvirt's state of `name` until `done` holds for it or `timeoutSeconds` pass: libvirt
    /// follows QEMU's events (a killed process, a resume on the private monitor) on its own
    /// thread and can trail them on a busy machine. Returns each state seen once, in order (the
    /// last is the final one), and how long the wait took.
    public func waitForState(of name: String, timeoutSeconds: Double, until done: (String) -> Bool) -> (seen: [String], millis: Int) {
        let start = Date()
        var seen: [String] = []
        while true {
            let state = self.state(of: name)
            if seen.last != state { seen.append(state) }
            if done(state) || Date().timeIntervalSince(start) >= timeoutSeconds { break }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return (seen, Int(Date().timeIntervalSince(start) * 1000))
    }

    /// Destroys and undefines both; never throws.
    public func remove() {
        for name in [primary, standby] {
            guard let d = try? connection.lookupDomain(named: name) else { continue }
            if (try? connection.isActive(d)) == true { try? connection.destroy(d) }
            if (try? connection.isPersistent(d)) == true { try? connection.undefine(d) }
        }
        try? connection.close()
    }
}

