import Foundation
import GeminusCore
import GeminusLibvirt
#if canImport(Glibc)
import Glibc
#endif

/// Makes a libvirt daemon answer on this machine for the demo by running the source tree's own
/// scripts, the ones the tests use: `Tools/install-deps libvirt` (the libvirt group of
/// Tools/packages.txt) if libvirtd or QEMU is missing, then `Tools/start-libvirt` (guest RAM on
/// /dev/shm, /dev/kvm for the kvm group, virtlogd and libvirtd; machines here have no
/// systemd). The scripts stay the one copy because Tools/test runs them before anything is
/// built. Root only; each step says what it does.
public enum LibvirtSetup {
    /// Nil when libvirt answers at `uri` (after starting it if needed), else why it cannot.
    public static func ensure(uri: String, say: (String) -> Void) -> String? {
        if canConnect(uri) { return nil }
        guard uri == LibvirtConnection.defaultURI else { return "libvirt does not answer at \(uri)" }
        guard getuid() == 0 else {
            return "libvirtd does not answer at \(uri) and starting it needs root (run the demo as root, or start libvirtd yourself)"
        }
        guard let installDeps = tool("install-deps"), let startLibvirt = tool("start-libvirt") else {
            return "libvirtd does not answer at \(uri), and this binary is not in a Geminus source tree, whose Tools/start-libvirt would start it (run that as root, or start libvirtd yourself)"
        }
        if locate("libvirtd") == nil || locate("qemu-system-x86_64") == nil {
            say("installing the libvirt group of Tools/packages.txt (\(installDeps) libvirt: apt-get, about a minute)")
            let status = run(installDeps, ["libvirt"])
            guard status == 0 else { return "\(installDeps) libvirt failed (status \(status); see its messages above)" }
        }
        say("starting virtlogd and libvirtd (\(startLibvirt))")
        let status = run(startLibvirt, [])
        guard status == 0 else { return "\(startLibvirt) failed (status \(status)); see /var/log/libvirt/libvirtd.log" }
        return canConnect(uri) ? nil : "libvirtd started but does not answer at \(uri); see /var/log/libvirt/libvirtd.log"
    }

    /// Tools/NAME of the source tree the binary was built in (.build/<triple>/debug/geminus is
    /// a few levels below it), as TestGuestLocator finds the test guest.
    public static func tool(_ name: String) -> String? {
        var dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<6 {
            let candidate = dir.appendingPathComponent("Tools/\(name)").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir.deleteLastPathComponent()
        }
        return nil
    }

    public static func canConnect(_ uri: String) -> Bool {
        guard let c = try? LibvirtConnection.open(uri: uri, timeout: 5) else { return false }
        try? c.close()
        return true
    }

    public static func locate(_ name: String) -> String? {
        for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] where FileManager.default.isExecutableFile(atPath: "\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        return nil
    }

    /// Runs a script of the source tree and waits for it; its output goes to standard error, so
    /// that it cannot mix into the demo's JSON on standard output.
    @discardableResult
    public static func run(_ path: String, _ arguments: [String]) -> Int32 {
        ChildProcess.run(path, arguments, stdout: .descriptor(2), stderr: .descriptor(2))
    }
}
