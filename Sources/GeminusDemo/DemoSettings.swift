import Foundation
import GeminusQEMU

/// Which VM `geminus demo` replicates.
public enum DemoMode: String, Sendable {
    case simulated, qemu, libvirt
}

/// Everything the demo's run needs, as the command line gave it.
public struct DemoSettings: Sendable {
    public var mode: DemoMode
    /// The multiboot test guest (qemu and libvirt modes).
    public var kernel: String?
    /// The binary started as `agent --role ...` for both agents (the CLI passes itself).
    public var agentExecutable: URL
    public var append: String
    public var uri: String
    public var durationSeconds: Double
    public var intervalMillis: Int
    public var takeoverAfterMillis: Int
    public var ramMib: Int
    public var dirtyRate: Int
    public var outputsPerSecond: Int
    public var seed: UInt64
    public var dirtyPages: DirtyPagePolicy.Method
    public var verifyTracking: Bool

    public init(mode: DemoMode, kernel: String?, agentExecutable: URL, append: String, uri: String, durationSeconds: Double,
                intervalMillis: Int, takeoverAfterMillis: Int, ramMib: Int, dirtyRate: Int, outputsPerSecond: Int, seed: UInt64,
                dirtyPages: DirtyPagePolicy.Method, verifyTracking: Bool) {
        self.mode = mode
        self.kernel = kernel
        self.agentExecutable = agentExecutable
        self.append = append
        self.uri = uri
        self.durationSeconds = durationSeconds
        self.intervalMillis = intervalMillis
        self.takeoverAfterMillis = takeoverAfterMillis
        self.ramMib = ramMib
        self.dirtyRate = dirtyRate
        self.outputsPerSecond = outputsPerSecond
        self.seed = seed
        self.dirtyPages = dirtyPages
        self.verifyTracking = verifyTracking
    }

    /// The demo's first line: what it replicates and how often.
    public var headline: String {
        switch mode {
        case .libvirt:
            return "Geminus demo: a \(ramMib) MiB libvirt domain (test guest \(kernel!), '\(append)') under TCG, checkpointed every \(intervalMillis) ms"
        case .qemu:
            return "Geminus demo: a \(ramMib) MiB QEMU guest (\(kernel!), '\(append)') under TCG, checkpointed every \(intervalMillis) ms"
        case .simulated:
            return "Geminus demo: a simulated \(ramMib) MiB VM writing \(dirtyRate) pages/s, checkpointed every \(intervalMillis) ms (seed \(seed))"
        }
    }
}

/// A step of the demo that did not happen (an agent that did not start, no takeover), with
/// the tail of the log that says why. Printed by the CLI as "Error: ...".
public struct DemoFailure: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}

/// The demo's verdicts and figures.
public struct DemoSummary {
    public var checks: [(name: String, passed: Bool, detail: String)] = []
    public var figures: [String: Any] = [:]
    /// Lines that say the figures for a reader, printed instead of the raw figures when present.
    public var overview: [String] = []
    /// One line with what the demo proves (the Linux demo's acknowledged/lost/twice/disk).
    public var verdict: String?
    public var passed: Bool { !checks.isEmpty && checks.allSatisfy(\.passed) }

    public init() {}

    public mutating func check(_ name: String, _ ok: Bool, _ detail: String) { checks.append((name, ok, detail)) }

    /// The summary `--json` prints.
    public var json: [String: Any] {
        var j = figures
        j["passed"] = passed
        if let verdict { j["verdict"] = verdict }
        j["checks"] = checks.map { ["name": $0.name, "passed": $0.passed, "detail": $0.detail] }
        return j
    }

    /// The summary as text, one line each.
    public var reportLines: [String] {
        var lines = ["", "Summary"]
        if overview.isEmpty {
            for key in figures.keys.sorted() { lines.append("  \(key): \(figures[key]!)") }
        } else {
            lines += overview
        }
        lines.append("")
        for c in checks { lines.append("  [\(c.passed ? "PASS" : "FAIL")] \(c.name): \(c.detail)") }
        lines.append("")
        if let verdict { lines.append("Verdict: \(verdict)") }
        lines.append(passed ? "All checks passed." : "SOME CHECKS FAILED.")
        return lines
    }
}
