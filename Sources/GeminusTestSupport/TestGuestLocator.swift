import Foundation
import GeminusCore

/// Finds and builds the tiny test guest from the source tree the binary was built in, for
/// `geminus demo` and `geminus bench`.
public enum TestGuestLocator {
    /// The built guest's path, or why there is none.
    public static func tinyGuest(say: (String) -> Void) -> Result<String, GeminusError> {
        var dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        var script: String?
        for _ in 0..<6 {
            let candidate = dir.appendingPathComponent("Tools/guest-tiny/build.sh").path
            if FileManager.default.fileExists(atPath: candidate) { script = candidate; break }
            dir.deleteLastPathComponent()
        }
        guard let script else {
            return .failure(GeminusError(.invalidArgument, "no test guest: pass --kernel (Tools/guest-tiny/build.sh prints one), or run the demo from its source tree"))
        }
        say("building the test guest (\(script))")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [script]
        let out = Pipe()
        p.standardOutput = out
        do { try p.run() } catch { return .failure(GeminusError(.io, "cannot run \(script): \(error)")) }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let path = text.split(separator: "\n").last.map(String.init) ?? ""
        guard p.terminationStatus == 0, FileManager.default.fileExists(atPath: path) else {
            return .failure(GeminusError(.io, "\(script) failed (status \(p.terminationStatus)); it needs gcc and binutils"))
        }
        return .success(path)
    }
}
