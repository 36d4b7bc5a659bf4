import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// The private QMP socket of a domain, beside libvirt's own monitor. The agent drives the
/// checkpoint cycle over it: stop/save/cont take about 2 ms there against 20 ms through
/// libvirt's QMP passthrough. `CAEnrollmentCheck` requires it in <qemu:commandline>,
/// `CAEnrollmentCheck.prepare` adds it, and the agent connects to it.
public enum PrivateQMP {
    /// Where QEMU creates the agent's private QMP sockets.
    public static let directory = "/run/geminus/qmp"

    /// /run/geminus/qmp/<name>.sock
    public static func socketPath(domain: String) -> String {
        "\(directory)/\(domain).sock"
    }

    /// The `<qemu:commandline>` arguments that give QEMU the agent's private QMP socket.
    public static func arguments(domain: String) -> [String] {
        ["-qmp", "unix:\(socketPath(domain: domain)),server=on,wait=off"]
    }

    /// Creates the private QMP directory so QEMU, running as libvirt's unprivileged user, can
    /// create its socket there: owned by that user (libvirt-qemu on Debian) with mode 0750
    /// when the user exists, else world-writable and sticky (1733). The agent is root and
    /// connects either way. It must exist before the domain starts, or QEMU cannot bind the
    /// socket and the start fails; /run is a tmpfs, so the agent recreates it at its start.
    public static func ensureDirectory(qemuUser: String = "libvirt-qemu") throws(GeminusError) {
        let parent = (directory as NSString).deletingLastPathComponent
        for (dir, mode) in [(parent, mode_t(0o755)), (directory, mode_t(0o750))] {
            if mkdir(dir, mode) != 0 && errno != EEXIST {
                throw GeminusError(.io, "cannot create \(dir): \(String(cString: strerror(errno)))", fix: "run as root")
            }
        }
        if let pw = getpwnam(qemuUser),
           chown(directory, pw.pointee.pw_uid, pw.pointee.pw_gid) == 0, chmod(directory, 0o750) == 0 {
            return
        }
        guard chmod(directory, 0o1733) == 0 else {
            throw GeminusError(.io, "cannot set the permissions of \(directory): \(String(cString: strerror(errno)))", fix: "run as root")
        }
    }
}
