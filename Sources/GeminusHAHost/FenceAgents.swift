import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// The fence agents of the cluster's nodes, from the fence configuration file: one line per node,
/// `NODE /absolute/path/to/fence_agent ARGS…` (no shell quoting; exit 0 confirms the node is off).
public struct FenceAgents: Sendable {
    public let commands: [String: [String]]
    /// Where the configuration came from, for the operator's messages.
    public let source: String?
    public let timeoutMillis: Int

    public init(commands: [String: [String]], source: String? = nil, timeoutMillis: Int) {
        self.commands = commands
        self.source = source
        self.timeoutMillis = timeoutMillis
    }

    /// Reads the configuration file (none: no node can be fenced, every fence fails).
    public init(configPath path: String?, timeoutMillis: Int) throws {
        guard let path else {
            self.init(commands: [:], timeoutMillis: timeoutMillis)
            return
        }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw GeminusError(.invalidArgument, "cannot read the fence configuration \(path)",
                               fix: "one line per node: `NODE /usr/sbin/fence_ipmilan --ip=… --username=… --password-script=… --action=off`")
        }
        self.init(commands: try Self.parse(text, path: path), source: path, timeoutMillis: timeoutMillis)
    }

    public static func parse(_ text: String, path: String) throws -> [String: [String]] {
        var out: [String: [String]] = [:]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            guard words.count >= 2, words[1].hasPrefix("/") else {
                throw GeminusError(.invalidArgument, "\(path) line \(i + 1): expected `NODE /absolute/path/to/fence_agent ARGS…`, got `\(line)`")
            }
            out[words[0]] = Array(words.dropFirst())
        }
        return out
    }

    /// Runs `node`'s fence agent, waiting at most the timeout: true only on exit 0. Blocks the
    /// calling thread (the host environment gives each fence its own).
    public func run(node: String) -> (confirmed: Bool, detail: String) {
        guard let argv = commands[node], let exe = argv.first else {
            return (false, "no fence agent configured for \(node)\(source.map { " in \($0)" } ?? " (no --fence-config)")")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = Array(argv.dropFirst())
        p.standardInput = FileHandle.nullDevice
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        let t0 = Monotonic.nanos()
        do { try p.run() } catch { return (false, "cannot run \(exe): \(error)") }
        let limit = t0 + UInt64(timeoutMillis) * 1_000_000
        while p.isRunning && Monotonic.nanos() < limit { Monotonic.sleep(nanos: 5_000_000) }
        if p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            return (false, "\(exe) did not finish within \(timeoutMillis) ms (killed)")
        }
        let ms = (Monotonic.nanos() - t0) / 1_000_000
        let text = String(decoding: out.fileHandleForReading.availableData.prefix(400), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let name = URL(fileURLWithPath: exe).lastPathComponent
        if p.terminationStatus == 0 { return (true, "\(name) exit 0 in \(ms) ms") }
        return (false, "\(name) exit \(p.terminationStatus) in \(ms) ms\(text.isEmpty ? "" : ": \(text)")")
    }
}
