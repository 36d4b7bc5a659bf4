import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `geminus demo --linux` (the default): the Linux test guest as an enrolled libvirt domain, a
/// client's transactions crossing one failover. The run itself is the source tree's kill test
/// (Tools/guest-linux/kill-test --kills 1 --narrate), the one the test suite runs 20 kills of, so
/// the demo and the proof cannot drift apart; this type finds it, runs it with its narration
/// shown live, and turns its JSON report into the demo's summary and verdict.
public struct LinuxDemo {
    /// The `geminus` binary the kill test enrols and runs the agents with (the CLI passes itself).
    public var geminus: URL
    /// build.sh's output directory (vmlinuz, initramfs.cpio.gz); nil: the kill test builds it.
    public var guestDirectory: String?
    /// Seconds of protected running before the primary host is killed (plus up to 1 s, random).
    public var killAfterSeconds: Double
    public var intervalMillis: Int
    public var ramMib: Int
    public var seed: UInt64
    /// Where the narration goes: this process's stdout (1), or stderr (2) under --json.
    public var progressDescriptor: Int32

    public init(geminus: URL, guestDirectory: String?, killAfterSeconds: Double, intervalMillis: Int, ramMib: Int,
                seed: UInt64, progressDescriptor: Int32) {
        self.geminus = geminus
        self.guestDirectory = guestDirectory
        self.killAfterSeconds = killAfterSeconds
        self.intervalMillis = intervalMillis
        self.ramMib = ramMib
        self.seed = seed
        self.progressDescriptor = progressDescriptor
    }

    /// The demo's first line.
    public var headline: String {
        "Geminus demo: a Linux VM (Debian's cloud kernel, \(ramMib) MiB, TCG) as an enrolled libvirt domain serving a "
            + "client's transactions; checkpointed every \(intervalMillis) ms; its primary host is killed about "
            + "\(Int(killAfterSeconds)) s after it is protected"
    }

    /// The kill test to run, or why the demo cannot run here (not root, not in a source tree).
    public func preflight() throws -> String {
        guard getuid() == 0 else {
            throw DemoFailure(description: "the Linux demo needs root: it defines libvirt system domains (qemu:///system) and puts "
                + "its client in a network namespace. Fix: run it as root (sudo Tools/demo), or run `geminus demo --tiny`, "
                + "which replicates the simulated VM when it cannot have libvirt")
        }
        guard let killTest = LibvirtSetup.tool("guest-linux/kill-test") else {
            throw DemoFailure(description: "the Linux demo runs Tools/guest-linux/kill-test of the source tree this binary was "
                + "built in, and there is none above \(geminus.path). Fix: run the binary of a Geminus clone (Tools/demo builds "
                + "one), or `geminus demo --tiny`")
        }
        return killTest
    }

    /// Runs the kill test (`preflight()`'s) and reads its report. Throws when it stopped before a
    /// verdict (the report's error, with where the logs are).
    public func run(_ killTest: String) throws -> DemoSummary {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("geminus-demo-linux-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        var arguments = ["--geminus", geminus.path, "--kills", "1", "--narrate", "--dir", dir.path, "--disk", "rw",
                         "--between", "\(killAfterSeconds)", "\(killAfterSeconds + 1)", "--interval-millis", "\(intervalMillis)",
                         "--ram-mib", "\(ramMib)", "--seed", "\(seed)"]
        if let guestDirectory { arguments += ["--out", guestDirectory] }
        // Its stdout repeats the report it writes to report.json: read the file instead.
        let status = ChildProcess.run(killTest, arguments, stdout: .discard, stderr: .descriptor(progressDescriptor))
        let reportFile = dir.appendingPathComponent("report.json")
        guard let data = try? Data(contentsOf: reportFile),
              let report = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw DemoFailure(description: "\(killTest) ended with status \(status) and wrote no report (\(reportFile.path)); "
                + "its messages are above, the agents' and guests' logs in \(dir.path)")
        }
        if let error = report["error"] as? String {
            throw DemoFailure(description: "the Linux demo stopped: \(error). Logs (agents, serial consoles, client) in \(dir.path)")
        }
        return LinuxDemoReport(report).summary
    }
}

/// The kill test's JSON report (Tools/guest-linux/kill-test, one kill) as the demo's summary:
/// figures, checks and the verdict line.
public struct LinuxDemoReport {
    let report: [String: Any]

    public init(_ report: [String: Any]) { self.report = report }

    var kill: [String: Any] { (report["kills"] as? [[String: Any]])?.first ?? [:] }
    var client: [String: Any] { report["client"] as? [String: Any] ?? [:] }

    func int(_ d: [String: Any], _ key: String) -> Int? { (d[key] as? NSNumber)?.intValue }
    func double(_ d: [String: Any], _ key: String) -> Double? { (d[key] as? NSNumber)?.doubleValue }
    func text(_ value: Double?, _ format: String = "%.1f") -> String { value.map { String(format: format, $0) } ?? "?" }

    public var summary: DemoSummary {
        var s = DemoSummary()
        let latency = client["latency_ms"] as? [String: Any] ?? [:]
        let acknowledged = int(client, "acknowledged") ?? 0
        let lost = int(client, "lost"), changed = int(client, "changed")
        let twice = int(client, "duplicated"), chain = int(client, "chain_errors")
        let afterTakeover = kill["check_after"] as? [String: Any] ?? [:]
        let atEnd = report["guest_check"] as? [String: Any] ?? [:]
        let disk = report["disk"] as? String ?? "?"
        let takeover = int(kill, "takeover_ms")
        let gap = kill["client_gap_ms"] as? [String: Any] ?? [:]
        let reconnects = int(client, "reconnects") ?? 0

        s.figures = ["guest": "linux", "kernel": report["kernel_version"] ?? "?", "bootSeconds": report["boot_to_service_seconds"] ?? NSNull(),
                     "timeToProtectedSeconds": report["first_protected_seconds"] ?? NSNull(),
                     "takeoverMillis": takeover.map { $0 as Any } ?? NSNull(),
                     "resumedFromEpoch": (kill["took_over_event"] as? [String: Any])?["fromEpoch"] ?? NSNull(),
                     "reprotectedSeconds": kill["reprotected_seconds"] ?? NSNull(),
                     "clientFirstReplyAfterKillMillis": gap["first_reply_after_kill"] ?? NSNull(),
                     "acknowledged": acknowledged, "lost": lost ?? NSNull(), "changed": changed ?? NSNull(),
                     "appliedTwice": twice ?? NSNull(), "reconnects": reconnects,
                     "transactionsPerSecond": client["per_second"] ?? 0, "latencyMillis": latency, "disk": disk,
                     "diskMismatches": (int(afterTakeover, "mismatches") ?? 0) + (int(atEnd, "mismatches") ?? 0),
                     "runSeconds": report["seconds"] ?? 0, "logs": report["dir"] ?? ""]

        let tookOver = takeover != nil
        s.check("the standby took over", tookOver, tookOver
            ? "host B resumed the guest from checkpoint \(s.figures["resumedFromEpoch"]!), \(takeover!) ms after the SIGKILL of host A's agent and QEMU"
            : "no takeover after the SIGKILL")
        if tookOver {
            s.check("the same guest carried on", kill["same_boot"] as? Bool == true, kill["same_boot"] as? Bool == true
                ? "same boot marker after the takeover: resumed from its checkpoint, not rebooted; the client's first reply came \(gap["first_reply_after_kill"] ?? "?") ms after the kill, \(reconnects) reconnect(s)"
                : "the guest's boot marker changed: it was booted again, not resumed")
        }
        let dumpError = client["dump_error"] as? String
        s.check("no acknowledged transaction lost", lost == 0 && changed == 0 && dumpError == nil, dumpError.map { "the guest's log could not be read: \($0)" }
            ?? "\(acknowledged) acknowledged, each looked up in the guest's log after the failover: \(lost.map(String.init) ?? "?") missing, \(changed.map(String.init) ?? "?") with another seq or balance")
        s.check("none applied twice", twice == 0 && chain == 0,
                "\(twice.map(String.init) ?? "?") ids twice in the guest's log; \(chain.map(String.init) ?? "?") breaks in its seq and balance chain")
        let afterOK = afterTakeover["result"] as? String == "ok" && int(afterTakeover, "mismatches") == 0
        let endOK = atEnd["result"] as? String == "ok" && int(atEnd, "mismatches") == 0
        s.check("disk consistent with RAM", disk == "rw" && afterOK && endOK, disk != "rw"
            ? "the guest's disk was \(disk), not a replicated writable disk: not checked"
            : "the guest compared its whole disk log with its RAM after the takeover (\(afterTakeover["result"] ?? "?"), \(afterTakeover["mismatches"] ?? "?") mismatches) and at the end (\(atEnd["result"] ?? "?"), \(atEnd["mismatches"] ?? "?"))")
        if tookOver {
            let again = double(kill, "reprotected_seconds")
            s.check("protected again", again != nil, again.map { "host A came back as the new standby; protected again \(text($0)) s later" }
                ?? "the killed side never became the new standby")
        }
        // The kill test's own verdict covers what the checks above may not name.
        if report["ok"] as? Bool != true && s.passed {
            s.check("kill test verdict", false, "Tools/guest-linux/kill-test reported ok=false: see \(report["dir"] ?? "its report")/report.json")
        }

        s.overview = [
            "  guest: Linux \(report["kernel_version"] ?? "?"), up \(text(double(report, "boot_to_service_seconds"))) s after virsh start; "
                + "protected \(text(double(report, "first_protected_seconds"))) s after the pair started",
            "  client: \(acknowledged) transactions acknowledged, \(text(double(client, "per_second"), "%.0f"))/s, latency p50 "
                + "\(text(double(latency, "p50"), "%.2f")) ms p99 \(text(double(latency, "p99"), "%.1f")) ms, \(reconnects) reconnect(s)",
            "  failover: takeover \(takeover.map(String.init) ?? "?") ms after the SIGKILL; the client's first reply "
                + "\(gap["first_reply_after_kill"] ?? "?") ms after it; protected again after \(text(double(kill, "reprotected_seconds"))) s",
            "  run: \(text(double(report, "seconds"))) s; logs (agents, serial consoles, every reply) in \(report["dir"] ?? "?")",
        ]
        s.verdict = "acknowledged transactions \(acknowledged), lost \(lost.map(String.init) ?? "?"), applied twice "
            + "\(twice.map(String.init) ?? "?"), disk \(disk == "rw" && afterOK && endOK ? "consistent with RAM" : disk == "rw" ? "NOT consistent with RAM" : "not checked (\(disk))")"
        return s
    }
}
