import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Where the preload library QEMU needs for write tracking is (Tools/uffd-preload/build.sh).
public enum WriteTrackingPreload {
    public static let fileName = "libgeminus-uffd-preload.so"
    /// Overrides the search: the library's full path.
    public static let environmentVariable = "GEMINUS_UFFD_PRELOAD"
    public static let buildHint = "build it with Tools/uffd-preload/build.sh (prints its path) and install it where QEMU's user can read it: install -D -m 0644 \"$(Tools/uffd-preload/build.sh)\" /usr/local/lib/geminus/\(fileName)"

    /// The directories searched, in order, after `GEMINUS_UFFD_PRELOAD`: beside this process's
    /// executable and up to two levels above it (a swift build tree keeps it in
    /// .build/geminus-uffd-preload/, the executables in .build/<triple>/<config>/), then the
    /// install locations.
    public static func searchDirectories() -> [String] {
        var dirs: [String] = []
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            var url = URL(fileURLWithPath: exe).deletingLastPathComponent()
            for _ in 0..<3 {
                dirs.append(url.path)
                dirs.append(url.appendingPathComponent("geminus-uffd-preload").path)
                url.deleteLastPathComponent()
            }
        }
        dirs += ["/usr/local/lib/geminus", "/usr/lib/geminus"]
        return dirs
    }

    /// The library's path, or nil when it is nowhere to be found.
    public static func locate() -> String? {
        if let p = ProcessInfo.processInfo.environment[environmentVariable], !p.isEmpty {
            return access(p, R_OK) == 0 ? p : nil
        }
        for d in searchDirectories() {
            let p = d + "/" + fileName
            if access(p, R_OK) == 0 { return p }
        }
        return nil
    }

    /// The library's path, or an error saying how to get it.
    public static func require() throws(GeminusError) -> String {
        guard let p = locate() else {
            let env = ProcessInfo.processInfo.environment[environmentVariable]
            throw GeminusError(.io, env.map { "\(environmentVariable)=\($0) is not a readable file" }
                                        ?? "the write-tracking preload library \(fileName) was not found (searched \(searchDirectories().joined(separator: ", ")))",
                               fix: buildHint + ", or set \(environmentVariable) to its path")
        }
        return p
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
