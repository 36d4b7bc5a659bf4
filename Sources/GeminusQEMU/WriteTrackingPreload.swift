import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Where the preload library QEMU needs for write tracking is (Tools/uffd-preload/install.sh).
///
/// QEMU loads it into the guest's process (as root with `--guest qemu`), and `enroll --prepare`
/// writes its path into the domain's definition for good: whoever can replace the file owns
/// every protected VM. So a library is accepted only where only root can change it (review M7):
/// the file and every directory up to / owned by root and not writable by group or others.
public enum WriteTrackingPreload {
    public static let fileName = "libgeminus-uffd-preload.so"
    /// Overrides the search: the library's full path (checked like any other).
    public static let environmentVariable = "GEMINUS_UFFD_PRELOAD"
    /// Where the install step puts it (Tools/uffd-preload/install.sh).
    public static let installDirectory = "/usr/local/lib/geminus"
    public static let buildHint = "install it as root with Tools/uffd-preload/install.sh (builds it and puts it in \(installDirectory)/\(fileName), root-owned, mode 0644, where libvirt's QEMU user can read it)"

    /// The directories searched, in order, after `GEMINUS_UFFD_PRELOAD`: the install locations.
    /// A build tree is not searched: it belongs to whoever built it, and libvirt's QEMU user
    /// often cannot read it.
    public static func searchDirectories() -> [String] {
        [installDirectory, "/usr/lib/geminus"]
    }

    /// The library's checked, link-free path, or nil when there is none to trust.
    public static func locate(environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        try? find(environment: environment)
    }

    /// The library's checked, link-free path, or an error saying why none is accepted and how
    /// to install one.
    public static func require(environment: [String: String] = ProcessInfo.processInfo.environment) throws(GeminusError) -> String {
        try find(environment: environment)
    }

    private static func find(environment: [String: String]) throws(GeminusError) -> String {
        if let p = environment[environmentVariable], !p.isEmpty {
            do throws(GeminusError) {
                return try checkTrusted(p)
            } catch {
                var e = error
                e.message = "\(environmentVariable)=\(p): \(e.message)"
                throw e
            }
        }
        var refusals: [GeminusError] = []
        for d in searchDirectories() {
            let p = d + "/" + fileName
            guard access(p, F_OK) == 0 else { continue }
            do throws(GeminusError) { return try checkTrusted(p) } catch { refusals.append(error) }
        }
        if let first = refusals.first { throw first }
        throw GeminusError(.io, "the write-tracking preload library \(fileName) was not found (searched \(searchDirectories().joined(separator: ", ")))",
                           fix: buildHint + ", or set \(environmentVariable) to its path")
    }

    /// `path` with its links resolved, if the file and every directory above it belong to root
    /// and cannot be written by group or others; else an error that says where to install it.
    public static func checkTrusted(_ path: String) throws(GeminusError) -> String {
        guard let resolvedC = realpath(path, nil) else {
            throw GeminusError(.io, "the write-tracking preload library \(path) cannot be read: \(String(cString: strerror(errno)))",
                               fix: buildHint)
        }
        let resolved = String(cString: resolvedC)
        free(resolvedC)
        var st = stat()
        guard stat(resolved, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            throw GeminusError(.io, "the write-tracking preload library \(resolved) is not a regular file", fix: buildHint)
        }
        try checkRootOnly(st, what: "the write-tracking preload library \(resolved)")
        var dir = resolved
        while dir != "/" {
            dir = (dir as NSString).deletingLastPathComponent
            guard stat(dir, &st) == 0 else {
                throw GeminusError(.io, "cannot check \(dir), a directory above the write-tracking preload library \(resolved): \(String(cString: strerror(errno)))", fix: buildHint)
            }
            try checkRootOnly(st, what: "\(dir), a directory above the write-tracking preload library \(resolved),")
        }
        return resolved
    }

    private static func checkRootOnly(_ st: stat, what: String) throws(GeminusError) {
        guard st.st_uid == 0 else {
            throw GeminusError(.io, "\(what) belongs to uid \(st.st_uid), not root: that user could replace what QEMU loads into every guest; refusing it",
                               fix: buildHint)
        }
        guard st.st_mode & 0o022 == 0 else {
            throw GeminusError(.io, "\(what) may be written by group or others (mode 0\(String(st.st_mode & 0o7777, radix: 8))): they could replace what QEMU loads into every guest; refusing it",
                               fix: buildHint)
        }
    }
}

extension QEMUGuestConfig {
    /// Has QEMU load the write-tracking preload library (`WriteTrackingPreload.locate()`).
    /// An `LD_PRELOAD` already in the environment is kept after it.
    public mutating func preloadWriteTracking(library: String) {
        let existing = environment["LD_PRELOAD"] ?? ProcessInfo.processInfo.environment["LD_PRELOAD"] ?? ""
        environment["LD_PRELOAD"] = existing.isEmpty ? library : "\(library) \(existing)"
    }
}
