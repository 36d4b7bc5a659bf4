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
    /// create its socket there: owned by that user with mode 0750 (root's alone, 0700, when
    /// libvirt runs QEMU as root). Never open to every user (review M9): another user could
    /// plant `<domain>.sock` and stop the domain from starting, or listen in QEMU's place.
    /// QEMU's user is `qemuUser` when given, else the one libvirt runs QEMU as
    /// (`LibvirtQEMUConf.qemuUser`); with none known it is an error that says how to name it.
    /// The agent is root and connects either way. It must exist before the domain starts, or
    /// QEMU cannot bind the socket and the start fails; /run is a tmpfs, so the agent recreates
    /// it at its start.
    public static func ensureDirectory(qemuUser: String? = nil, directory: String = PrivateQMP.directory,
                                       conf: LibvirtQEMUConf = .read()) throws(GeminusError) {
        let owner = if let qemuUser { try LibvirtQEMUConf.account(named: qemuUser) } else { try conf.qemuUser() }
        let parent = (directory as NSString).deletingLastPathComponent
        try makeRootDirectory(parent, mode: 0o755)
        try makeRootDirectory(directory, mode: 0o700)
        let mode: mode_t = owner.uid == 0 ? 0o700 : 0o750
        guard chown(directory, owner.uid, owner.gid) == 0, chmod(directory, mode) == 0 else {
            throw GeminusError(.io, "cannot give \(directory) to QEMU's user \(owner.name): \(String(cString: strerror(errno)))", fix: "run the agent as root")
        }
    }

    /// `dir` exists as a real directory (not a link) and, when this call created it, has `mode`.
    private static func makeRootDirectory(_ dir: String, mode: mode_t) throws(GeminusError) {
        if mkdir(dir, mode) != 0 && errno != EEXIST {
            throw GeminusError(.io, "cannot create \(dir): \(String(cString: strerror(errno)))", fix: "run as root")
        }
        var st = stat()
        guard lstat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw GeminusError(.io, "\(dir) is not a directory (a symbolic link or a file); refusing to put QMP sockets there",
                               fix: "remove it; the agent creates it")
        }
        // Left world-writable by an older agent (1733), or made by someone else: made ours.
        if st.st_mode & 0o022 != 0 || (st.st_uid != geteuid() && st.st_uid != 0) {
            guard chown(dir, geteuid(), getegid()) == 0, chmod(dir, mode) == 0 else {
                throw GeminusError(.io, "\(dir) may be written by other users (mode 0\(String(st.st_mode & 0o7777, radix: 8))) and cannot be fixed: \(String(cString: strerror(errno)))",
                                   fix: "run the agent as root, or remove \(dir)")
            }
        }
    }
}

/// What libvirt's QEMU driver is configured with (/etc/libvirt/qemu.conf), as far as the agent
/// needs it: the user QEMU runs as and where guest RAM files live.
public struct LibvirtQEMUConf: Sendable, Equatable {
    public static let path = "/etc/libvirt/qemu.conf"
    /// libvirt's built-in default when qemu.conf sets none.
    public static let defaultMemoryBackingDirectory = "/var/lib/libvirt/qemu/ram"

    /// `user = "…"` (a name, or `+UID`), nil when not set.
    public var user: String?
    /// `memory_backing_dir = "…"`, else libvirt's default.
    public var memoryBackingDirectory: String

    public init(user: String? = nil, memoryBackingDirectory: String = LibvirtQEMUConf.defaultMemoryBackingDirectory) {
        self.user = user
        self.memoryBackingDirectory = memoryBackingDirectory
    }

    /// Parses qemu.conf's `key = "value"` lines (comments and other keys ignored).
    public init(text: String) {
        self.init()
        for line in text.split(separator: "\n") {
            let code = line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let parts = code.split(separator: "=", maxSplits: 1)
            guard parts.count == 2 else { continue }
            let key = parts[0].trimmingCharacters(in: .whitespaces)
            let value = parts[1].trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\""))
            switch key {
            case "user": user = value
            case "memory_backing_dir": memoryBackingDirectory = value
            default: continue
            }
        }
    }

    /// This host's qemu.conf (libvirt's defaults when it cannot be read).
    public static func read(path: String = LibvirtQEMUConf.path) -> LibvirtQEMUConf {
        (try? String(contentsOfFile: path, encoding: .utf8)).map { LibvirtQEMUConf(text: $0) } ?? LibvirtQEMUConf()
    }

    /// The account libvirt starts QEMU as: qemu.conf's `user`, else the distributions' defaults
    /// (libvirt-qemu on Debian, qemu on RHEL) that exist here; else an error saying how to name it.
    public func qemuUser(candidates: [String] = ["libvirt-qemu", "qemu"]) throws(GeminusError) -> (name: String, uid: uid_t, gid: gid_t) {
        if let user { return try Self.account(named: user) }
        for name in candidates {
            if let found = try? Self.account(named: name) { return found }
        }
        throw GeminusError(.invalidArgument, "cannot tell which user libvirt runs QEMU as: \(Self.path) sets no `user` and none of \(candidates.joined(separator: ", ")) exists",
                           fix: "set `user = \"NAME\"` in \(Self.path) to the account libvirt starts QEMU as (and restart libvirtd)")
    }

    /// A user name, or `+UID` as qemu.conf allows.
    public static func account(named name: String) throws(GeminusError) -> (name: String, uid: uid_t, gid: gid_t) {
        if name.hasPrefix("+"), let uid = uid_t(name.dropFirst()) {
            return (name, uid, getpwuid(uid)?.pointee.pw_gid ?? gid_t(uid))
        }
        guard let pw = getpwnam(name) else {
            throw GeminusError(.invalidArgument, "QEMU's user \(name) does not exist on this host",
                               fix: "set `user` in \(path) to the account libvirt starts QEMU as")
        }
        return (name, pw.pointee.pw_uid, pw.pointee.pw_gid)
    }
}
