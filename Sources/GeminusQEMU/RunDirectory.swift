import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// The agent's private directory for the files of the QEMUs it starts (`--guest qemu`): RAM
/// files, device state, disks, QMP, serial, NIC and disk-export sockets, logs. One per agent
/// process, made by mkdtemp (mode 0700, a name nobody can guess: `geminus-run-<pid>-XXXXXX`), on
/// /dev/shm because guest RAM lives there. No other user can read guest RAM, plant a file or a link where the agent or QEMU
/// will open one, or listen where the agent connects (review H3).
public enum RunDirectory {
    /// This process's run directory, created at first use.
    public static var agent: String { created.path }

    /// Where the run directory is made: /dev/shm (guest RAM is there), else TMPDIR.
    static var parent: String {
        var st = stat()
        if stat("/dev/shm", &st) == 0 && st.st_mode & S_IFMT == S_IFDIR { return "/dev/shm" }
        let tmp = NSTemporaryDirectory()
        return tmp.hasSuffix("/") ? String(tmp.dropLast()) : tmp
    }

    private static let created: (path: String, error: GeminusError?) = {
        // The pid in the name lets a test harness sweep the directories of agents it killed.
        var template = Array("\(parent)/geminus-run-\(getpid())-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil }
        let path = String(cString: template.withUnsafeBufferPointer { $0.baseAddress! })
        guard made else {
            let e = GeminusError(.io, "cannot create the agent's run directory under \(parent): \(String(cString: strerror(errno)))",
                                 fix: "check that \(parent) exists and this agent may write there")
            return ("\(parent)/geminus-run-\(getpid())-unavailable", e)
        }
        // Left empty by the guests' own cleanup; removed then, as the agent exits.
        atexit { _ = rmdir(RunDirectory.agent) }
        return (path, nil)
    }()

    /// Throws unless `directory` is private to this agent: a real directory (not a link), owned
    /// by this user, mode exactly 0700.
    public static func checkPrivate(_ directory: String) throws(GeminusError) {
        if directory == created.path, let e = created.error { throw e }
        var st = stat()
        guard lstat(directory, &st) == 0 else {
            throw GeminusError(.io, "the run directory \(directory) is missing: \(String(cString: strerror(errno)))",
                               fix: "create it mode 0700, or let the agent make its own (the default)")
        }
        guard st.st_mode & S_IFMT == S_IFDIR else {
            throw GeminusError(.io, "the run directory \(directory) is not a directory (a symbolic link or a file); refusing to put guest files there",
                               fix: "remove it, or let the agent make its own run directory (the default)")
        }
        guard st.st_uid == geteuid() else {
            throw GeminusError(.io, "the run directory \(directory) belongs to uid \(st.st_uid), not to this agent (uid \(geteuid())); refusing to put guest files there",
                               fix: "let the agent make its own run directory (the default), or give it one it owns")
        }
        guard st.st_mode & 0o7777 == 0o700 else {
            throw GeminusError(.io, "the run directory \(directory) has mode 0\(String(st.st_mode & 0o7777, radix: 8)), not 0700: other users could reach guest RAM and sockets there",
                               fix: "chmod 700 \(directory), or let the agent make its own run directory (the default)")
        }
    }

    /// `checkPrivate` for the directory of each of `paths` (each checked once).
    public static func checkPrivate(directoriesOf paths: [String]) throws(GeminusError) {
        var seen = Set<String>()
        for p in paths {
            let dir = (p as NSString).deletingLastPathComponent
            if seen.insert(dir).inserted { try checkPrivate(dir.isEmpty ? "." : dir) }
        }
    }
}
