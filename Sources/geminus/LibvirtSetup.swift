import Foundation
import GeminusCore
import GeminusLibvirt
#if canImport(Glibc)
import Glibc
#endif

/// Makes a libvirt daemon answer on this machine for the demo, as Tools/start-libvirt does for
/// the tests: installs the packages if missing, puts guest RAM on /dev/shm, and starts virtlogd
/// and libvirtd (machines here have no systemd). Root only; each step says what it does.
enum LibvirtSetup {
    static let packages = ["libvirt-daemon-system", "libvirt-clients", "qemu-system-x86"]

    /// Nil when libvirt answers at `uri` (after starting it if needed), else why it cannot.
    static func ensure(uri: String, say: (String) -> Void) -> String? {
        if canConnect(uri) { return nil }
        guard uri == LibvirtConnection.defaultURI else { return "libvirt does not answer at \(uri)" }
        guard getuid() == 0 else {
            return "libvirtd does not answer at \(uri) and starting it needs root (run the demo as root, or start libvirtd yourself)"
        }
        if locate("libvirtd") == nil || locate("qemu-system-x86_64") == nil {
            say("installing \(packages.joined(separator: " ")) (apt-get, about a minute)")
            guard run("/usr/bin/apt-get", ["update", "-qq"]) == 0,
                  run("/usr/bin/apt-get", ["install", "-y", "-qq", "--no-install-recommends"] + packages) == 0 else {
                return "apt-get could not install \(packages.joined(separator: " ")) (see its messages above)"
            }
        }
        configureMemoryBacking()
        say("starting virtlogd and libvirtd")
        _ = run(locate("virtlogd") ?? "/usr/sbin/virtlogd", ["-d"])
        guard run(locate("libvirtd") ?? "/usr/sbin/libvirtd", ["-d"]) == 0 || canConnect(uri) else {
            return "libvirtd did not start; see /var/log/libvirt/libvirtd.log"
        }
        for _ in 0..<100 {
            if canConnect(uri) { return nil }
            usleep(100_000)
        }
        return "libvirtd started but does not answer at \(uri) after 10 s; see /var/log/libvirt/libvirtd.log"
    }

    /// Guest RAM in files on /dev/shm (the agent maps them), and /dev/kvm as Debian's udev
    /// rule leaves it: without udev, libvirt 9.0 re-probes QEMU for ~40 s at every start.
    static func configureMemoryBacking() {
        mkdir("/dev/shm/vmram", 0o755)
        let conf = "/etc/libvirt/qemu.conf"
        if let text = try? String(contentsOfFile: conf, encoding: .utf8),
           !text.split(separator: "\n").contains(where: { $0.hasPrefix("memory_backing_dir") }) {
            try? (text + "\nmemory_backing_dir = \"/dev/shm/vmram\"\n").write(toFile: conf, atomically: true, encoding: .utf8)
        }
        if FileManager.default.fileExists(atPath: "/dev/kvm"), let kvm = getgrnam("kvm") {
            _ = chown("/dev/kvm", 0, kvm.pointee.gr_gid)
            _ = chmod("/dev/kvm", 0o660)
        }
    }

    static func canConnect(_ uri: String) -> Bool {
        guard let c = try? LibvirtConnection.open(uri: uri, timeout: 5) else { return false }
        try? c.close()
        return true
    }

    static func locate(_ name: String) -> String? {
        for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] where FileManager.default.isExecutableFile(atPath: "\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        return nil
    }

    @discardableResult
    static func run(_ path: String, _ arguments: [String]) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        env["DEBIAN_FRONTEND"] = "noninteractive"
        p.environment = env
        do { try p.run() } catch { return -1 }
        p.waitUntilExit()
        return p.terminationStatus
    }
}
