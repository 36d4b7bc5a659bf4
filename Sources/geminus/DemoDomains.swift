import Foundation
import GeminusCore
import GeminusLibvirt
import GeminusLibvirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The demo's two libvirt domains: the protected VM (started) and the standby's definition of
/// it (on one machine they cannot share a name; on two hosts they would be one name). Both are
/// made CA-ready by the same rules as `geminus enroll --prepare`.
final class DemoDomains: @unchecked Sendable {
    let connection: LibvirtConnection
    let primary: String
    let standby: String

    init(uri: String, directory: URL, kernel: String, append: String, ramMiB: Int, say: (String) -> Void) throws {
        connection = try LibvirtConnection.open(uri: uri)
        let tag = "\(getpid())"
        primary = "geminus-demo-a-\(tag)"
        standby = "geminus-demo-b-\(tag)"
        try PrivateQMP.ensureDirectory()
        // QEMU runs as libvirt's unprivileged user: the kernel and serial logs must be where it
        // can read and write them.
        _ = chmod(directory.path, 0o755)
        let guest = directory.appendingPathComponent("guest.elf").path
        try FileManager.default.copyItem(atPath: kernel, toPath: guest)
        _ = chmod(guest, 0o644)
        for name in [primary, standby] {
            let serial = directory.appendingPathComponent("\(name).serial").path
            let plain = """
                <domain type='qemu'>
                  <name>\(name)</name>
                  <memory unit='MiB'>\(ramMiB)</memory>
                  <vcpu>1</vcpu>
                  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>\(guest)</kernel><cmdline>\(append)</cmdline></os>
                  <devices><serial type='file'><source path='\(serial)'/><target port='0'/></serial></devices>
                </domain>
                """
            let ready = try CAEnrollmentCheck.prepare(plain)
            let check = CAEnrollmentCheck(xml: ready)
            guard check.canProtect else {
                throw OperatorError(description: "the demo's domain is not CA-ready: \(check.problems.map(\.description).joined(separator: "; "))")
            }
            _ = try connection.defineDomain(xml: ready)
        }
    }

    func startPrimary() throws {
        try connection.start(try connection.lookupDomain(named: primary))
    }

    /// libvirt's word for the domain's state ("running", "paused", "shut off", ...).
    func state(of name: String) -> String {
        guard let d = try? connection.lookupDomain(named: name), let s = try? connection.state(of: d) else { return "unknown" }
        return "\(s.state)"
    }

    /// Destroys and undefines both; never throws.
    func remove() {
        for name in [primary, standby] {
            guard let d = try? connection.lookupDomain(named: name) else { continue }
            if (try? connection.isActive(d)) == true { try? connection.destroy(d) }
            if (try? connection.isPersistent(d)) == true { try? connection.undefine(d) }
        }
        try? connection.close()
    }
}

/// Finds and builds the tiny test guest from the source tree the binary was built in.
enum TestGuestLocator {
    static func tinyGuest(say: (String) -> Void) -> Result<String, OperatorError> {
        var dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        var script: String?
        for _ in 0..<6 {
            let candidate = dir.appendingPathComponent("Tools/guest-tiny/build.sh").path
            if FileManager.default.fileExists(atPath: candidate) { script = candidate; break }
            dir.deleteLastPathComponent()
        }
        guard let script else {
            return .failure(OperatorError(description: "no test guest: pass --kernel (Tools/guest-tiny/build.sh prints one), or run the demo from its source tree"))
        }
        say("building the test guest (\(script))")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [script]
        let out = Pipe()
        p.standardOutput = out
        do { try p.run() } catch { return .failure(OperatorError(description: "cannot run \(script): \(error)")) }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let path = text.split(separator: "\n").last.map(String.init) ?? ""
        guard p.terminationStatus == 0, FileManager.default.fileExists(atPath: path) else {
            return .failure(OperatorError(description: "\(script) failed (status \(p.terminationStatus)); it needs gcc and binutils"))
        }
        return .success(path)
    }
}
