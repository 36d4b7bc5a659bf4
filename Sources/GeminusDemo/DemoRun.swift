import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusQEMU
import GeminusTestSupport
import GeminusTransport
#if canImport(Glibc)
import Glibc
#endif

/// The demo's script: start two agent processes, watch, kill the primary, check.
public final class DemoRun {
    let s: DemoSettings
    let mode: DemoMode
    let kernel: String?
    let say: (String) -> Void
    /// Why the demo runs the simulated VM although a real one was the default.
    public var fallbackReason: String?
    /// The libvirt domains of the demo (primary's, standby's definition), when mode is libvirt.
    var domains: TestGuestDomains?
    let dir: URL
    let observer: OutputObserver
    var secondary: AgentProcess?
    var primary: AgentProcess?
    /// The killed primary's RAM file and device-state file: a dead host would take them along;
    /// here they would stay in /dev/shm.
    var deadPrimaryFiles: [String] = []

    /// `say` receives the progress lines as they happen.
    public init(settings: DemoSettings, say: @escaping (String) -> Void) throws {
        s = settings
        self.mode = settings.mode
        self.kernel = settings.kernel
        self.say = say
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("geminus-demo-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        observer = try OutputObserver()
    }

    /// Kills what is left (agents, domains) and removes the run's files.
    public func cleanUp() {
        primary?.kill(SIGKILL)
        secondary?.kill(SIGKILL)
        primary?.process.waitUntilExit()
        secondary?.process.waitUntilExit()
        observer.close()
        domains?.remove()
        for f in deadPrimaryFiles { unlink(f) }
        try? FileManager.default.removeItem(at: dir)
    }

    var executable: URL { s.agentExecutable }

    func common(_ role: String) -> [String] {
        // One host: nothing can partition it, so no witness (docs/ARBITRATION.md for the pair).
        var args = ["agent", "--arbitration", "none", "--role", role, "--vm", "demo", "--key", dir.appendingPathComponent("pair.key").path, "--events",
                    "--interval-millis", "\(s.intervalMillis)", "--takeover-after-millis", "\(s.takeoverAfterMillis)",
                    "--output-sink", "127.0.0.1:\(observer.port)", "--log-level", "notice", "--ram-mib", "\(s.ramMib)",
                    "--status-socket", dir.appendingPathComponent("\(role).sock").path]
        if mode != .simulated {
            args += ["--dirty-pages", s.dirtyPages.rawValue] + (s.verifyTracking ? ["--verify-tracking"] : [])
            // The tiny test guest keeps its progress counter here (the checks read it).
            args += ["--counter-address", "\(QEMUGuest.tinyGuestCounterAddress)"]
        }
        switch mode {
        // A console line every 4096 iterations (unless the operator chose): the output checked.
        case .qemu: args += ["--guest", "qemu", "--kernel", kernel!, "--append", s.append.contains("every=") ? s.append : s.append + " every=4096"]
        case .libvirt: args += ["--guest", "libvirt", "--uri", s.uri, "--domain", role == "primary" ? domains!.primary : domains!.standby]
        case .simulated: break
        }
        return args
    }

    /// Runs the demo to its verdicts; throws `DemoFailure` when a step does not happen.
    public func execute() throws -> DemoSummary {
        var summary = DemoSummary()
        summary.figures["mode"] = mode.rawValue
        if let fallbackReason { summary.figures["fallbackReason"] = fallbackReason }
        try PairKey.generate(path: dir.appendingPathComponent("pair.key").path)
        if mode == .libvirt {
            let d = try TestGuestDomains(uri: s.uri, prefix: "geminus-demo", directory: dir, kernel: kernel!, append: s.append, ramMiB: s.ramMib)
            domains = d
            try d.startPrimary()
            say("libvirt: defined \(d.primary) (started) and \(d.standby) (the standby's definition), both made CA-ready by `enroll --prepare`'s rules")
        }

        let sec = try AgentProcess(name: "secondary", executable: executable,
                                   arguments: common("secondary") + ["--listen", "127.0.0.1:0"],
                                   logFile: dir.appendingPathComponent("secondary.log"))
        secondary = sec
        guard let listening = sec.wait(for: "listening", timeoutSeconds: 10), let port = listening["port"] as? Int else {
            throw failure("the secondary agent did not start", log: "secondary.log")
        }
        say("secondary agent (pid \(sec.process.processIdentifier)) listening on 127.0.0.1:\(port)")
        let pri = try AgentProcess(name: "primary", executable: executable,
                                   arguments: common("primary") + ["--peer", "127.0.0.1:\(port)",
                                                                    "--dirty-rate", "\(s.dirtyRate)", "--outputs-per-second", "\(s.outputsPerSecond)",
                                                                    "--seed", "\(s.seed)", "--trace-epochs"],
                                   logFile: dir.appendingPathComponent("primary.log"))
        primary = pri
        var guestPid: Int32?
        if mode != .simulated {
            guard let started = pri.wait(for: "guest-started", timeoutSeconds: 20), let pid = started["pid"] as? Int else {
                throw failure("the primary's QEMU did not start", log: "primary.log")
            }
            guestPid = Int32(pid)
            if mode == .qemu { deadPrimaryFiles = (started["ramFile"] as? String).map { [$0, $0 + ".devstate"] } ?? [] }
            say("primary agent (pid \(pri.process.processIdentifier)) \(mode == .qemu ? "started" : "attached to") QEMU (pid \(pid)), connecting to the secondary")
        } else {
            say("primary agent (pid \(pri.process.processIdentifier)) running the VM, connecting to the secondary")
        }
        guard pri.wait(for: "protected", timeoutSeconds: 20) != nil else {
            throw failure("the VM never became protected", log: "primary.log")
        }
        say("protected: the secondary acknowledged the full checkpoint; replicating for \(s.durationSeconds) s")

        // Live progress while replicating.
        let start = Date()
        var lastLine = Date.distantPast
        while Date().timeIntervalSince(start) < s.durationSeconds {
            Thread.sleep(forTimeInterval: 0.1)
            if Date().timeIntervalSince(lastLine) >= 0.5, let p = pri.last("progress") {
                lastLine = Date()
                say(progressLine(p, elapsed: Date().timeIntervalSince(start)))
            }
        }
        // A random moment inside an epoch, so the kill lands mid-capture, mid-send or mid-ack.
        var rng = Xoshiro256(seed: s.seed)
        Thread.sleep(forTimeInterval: Double(rng.next() % UInt64(s.intervalMillis * 1000)) / 1e6)
        let beforeKill = pri.last("progress") ?? [:]
        let killMicros = WallClock.micros()
        pri.kill(SIGKILL)
        if let guestPid { kill(guestPid, SIGKILL) }
        pri.process.waitUntilExit()
        say(guestPid == nil ? "killed the primary agent with SIGKILL (its VM died with it)"
                            : "killed the primary agent and its QEMU with SIGKILL, as a host failure would")

        guard let took = sec.wait(for: "took-over", timeoutSeconds: Double(s.takeoverAfterMillis) / 1000 + 10) else {
            throw failure("the secondary did not take over", log: "secondary.log")
        }
        let takeoverMicros = (took["timeMicros"] as? UInt64 ?? 0) &- killMicros
        say("the secondary resumed the VM from checkpoint \(took["fromEpoch"] ?? "?") in \(String(format: "%.1f", Double(takeoverMicros) / 1000)) ms after the kill")
        // Progress comes every 500 ms; after 1.2 s the latest one shows the resumed VM running.
        Thread.sleep(forTimeInterval: 1.2)
        let after = sec.last("progress")
        // A clean stop, so the secondary shuts its QEMU down; cleanUp() SIGKILLs only a straggler.
        sec.kill(SIGTERM)
        let stopDeadline = Date().addingTimeInterval(5)
        while sec.process.isRunning && Date() < stopDeadline { Thread.sleep(forTimeInterval: 0.05) }

        verify(&summary, took: took, beforeKill: beforeKill, after: after, takeoverMicros: takeoverMicros,
               capturedCounter: pri.counter(atCheckpoint: took["fromEpoch"] as? UInt64 ?? 0), ackedEpoch: pri.highestAcknowledged)
        if let guestPid {
            let state = processState(guestPid)
            var ok = state == nil || state == "Z"
            var detail = "the old primary's QEMU (pid \(guestPid)) is \(state == nil ? "gone" : state == "Z" ? "dead (a zombie awaiting its reaper)" : "STILL RUNNING (state \(state!))"); the resumed QEMU is pid \(took["guestPid"] ?? "?")"
            if let d = domains {
                // libvirt learns of a killed QEMU from its monitor socket closing, on its own
                // thread: on a busy machine its view can trail the process's death. The
                // process check above is the proof; libvirt must agree within 10 s.
                let (seen, lagMillis) = d.waitForState(of: d.primary, timeoutSeconds: 10) { $0 != "running" }
                let primaryState = seen.last ?? "unknown"
                let standbyState = d.state(of: d.standby)
                ok = ok && primaryState != "running" && standbyState == "running"
                detail += "; libvirt: \(d.primary) \(primaryState)\(lagMillis >= 50 ? " (after \(lagMillis) ms)" : ""), \(d.standby) \(standbyState)"
            }
            summary.check("at most one running copy", ok, detail)
        }
        return summary
    }

    /// The slack over the silence bound for failover: the agent's 1 ms loop tick, resuming the
    /// standby and the event's trip to this process.
    static let failoverSlackMillis = 100

    func verify(_ summary: inout DemoSummary, took: [String: Any], beforeKill: [String: Any], after: [String: Any]?, takeoverMicros: UInt64,
                capturedCounter: UInt64?, ackedEpoch: UInt64) {
        let resumedCounter = took["counter"] as? UInt64 ?? 0
        let fromEpoch = took["fromEpoch"] as? UInt64 ?? 0
        let outputSequence = took["outputSequence"] as? UInt64 ?? 0
        let generation = took["generation"] as? UInt64 ?? 0
        let ring = (took["recentOutputs"] as? [[UInt64]] ?? []).reduce(into: [UInt64: UInt64]()) { $0[$1[0]] = $1[1] }
        let pending = took["pendingOutput"] as? UInt64
        let seed = took["seed"] as? UInt64 ?? s.seed
        let (packets, malformed) = observer.snapshot

        summary.figures["takeoverMillis"] = Double(takeoverMicros) / 1000
        summary.figures["takeoverBoundMillis"] = s.takeoverAfterMillis
        summary.figures["resumedFromEpoch"] = fromEpoch
        summary.figures["resumedCounter"] = resumedCounter
        summary.figures["lastAcknowledgedEpochSeenByPrimary"] = ackedEpoch
        summary.figures["epochsPerSecond"] = beforeKill["epochsPerSecond"] ?? 0
        summary.figures["pauseMicros"] = beforeKill["pauseMicros"] ?? [:]
        summary.figures["fullSyncPauseMicros"] = beforeKill["fullSyncPauseMicros"] ?? [:]
        for part in ["stopMicros", "dirtyPagesMicros", "deviceStateMicros", "resumeMicros"] {
            if let p = beforeKill[part] as? [String: Any], !p.isEmpty { summary.figures[part] = p }
        }
        if let method = beforeKill["dirtyPages"] { summary.figures["dirtyPageMethod"] = method }
        if s.verifyTracking {
            // The primary's own count of checkpoints it verified against a full comparison.
            let verified = Int(beforeKill["verifiedEpochs"] as? String ?? "") ?? 0
            let missed = Int(beforeKill["missedPages"] as? String ?? "") ?? -1
            summary.figures["verifiedEpochs"] = verified
            summary.figures["trackingMissedPages"] = missed
            summary.check("write tracking missed no page", verified > 0 && missed == 0,
                          "\(verified) checkpoints checked against a full comparison, \(missed < 0 ? "no count reported (was write tracking in use?)" : "\(missed) pages missed")")
        }
        summary.figures["commitMicros"] = beforeKill["commitMicros"] ?? [:]
        summary.figures["fullSyncCommitMicros"] = beforeKill["fullSyncCommitMicros"] ?? [:]
        summary.figures["compressionRatio"] = beforeKill["compressionRatio"] ?? 0
        summary.figures["wireBytes"] = beforeKill["wireBytes"] ?? 0
        summary.figures["packetsObserved"] = packets.count

        summary.check("resumed exactly the last committed checkpoint",
                      fromEpoch >= ackedEpoch && ackedEpoch > 0 && capturedCounter == resumedCounter,
                      "resumed epoch \(fromEpoch) at counter \(resumedCounter); the primary captured that epoch at counter \(capturedCounter.map(String.init) ?? "unknown") and had received acknowledgements up to epoch \(ackedEpoch)")

        if mode == .qemu {
            verifyConsole(&summary, generation: generation, resumedCounter: resumedCounter)
        } else if mode == .libvirt {
            summary.figures["networkOutput"] = "none: the test domain has no NIC, and its console goes to a file libvirt owns, so the output checks do not apply"
        } else {
            verifyOutput(&summary, packets: packets, malformed: malformed, generation: generation, outputSequence: outputSequence,
                         ring: ring, pending: pending, seed: seed)
        }

        let laterCounter = after?["counter"] as? UInt64 ?? 0
        summary.check("the resumed VM keeps running", laterCounter > resumedCounter,
                      "counter \(resumedCounter) at resume, \(laterCounter) about a second later")
        let boundMillis = s.takeoverAfterMillis + Self.failoverSlackMillis
        summary.check("failover within the bound", takeoverMicros <= UInt64(boundMillis) * 1000,
                      "\(String(format: "%.1f", Double(takeoverMicros) / 1000)) ms from SIGKILL to running (of which resuming the standby \(String(format: "%.1f", Double(took["resumeMicros"] as? UInt64 ?? 0) / 1000)) ms); bound \(boundMillis) ms (silence \(s.takeoverAfterMillis) ms + \(Self.failoverSlackMillis) ms)")
    }

    /// S2 for a real guest's output: its console lines ("counter=N", the iteration it is in),
    /// held by the agent until their checkpoint is acknowledged. Nothing the old primary
    /// released may be ahead of the checkpoint the secondary resumed, and the new primary's
    /// lines go on from there: a line never "un-happens".
    func verifyConsole(_ summary: inout DemoSummary, generation: UInt64, resumedCounter: UInt64) {
        func counters(_ lines: [(generation: UInt64, text: String)]) -> [UInt64] {
            lines.compactMap { l in l.text.hasPrefix("counter=") ? UInt64(l.text.dropFirst(8).trimmingCharacters(in: .whitespacesAndNewlines)) : nil }
        }
        let lines = observer.consoleLines
        let old = counters(lines.filter { $0.generation < generation })
        let new = counters(lines.filter { $0.generation == generation })
        summary.figures["consoleLinesObserved"] = lines.count
        summary.check("no console output released ahead of its checkpoint (S2)",
                      !old.isEmpty && !new.isEmpty && (old.max() ?? 0) <= resumedCounter && (new.min() ?? 0) >= (old.max() ?? 0),
                      "\(old.count) console lines from the old primary, the last at counter \(old.max() ?? 0); the resumed checkpoint is at counter \(resumedCounter); the new primary's \(new.count) lines start at counter \(new.min() ?? 0)")
    }

    /// S2 and output continuity, from everything the observer received.
    func verifyOutput(_ summary: inout DemoSummary, packets: [OutputObserver.Packet], malformed: Int, generation: UInt64,
                      outputSequence: UInt64, ring: [UInt64: UInt64], pending: UInt64?, seed: UInt64) {
        let old = packets.filter { $0.generation < generation }
        let new = packets.filter { $0.generation == generation }
        let highestOld = old.map(\.packet.sequence).max() ?? 0
        let verdict = ReleasedOutputCheck.judge(old.map(\.packet), outputSequence: outputSequence, history: ring)
        let (beyond, mismatched) = (verdict.beyond, verdict.mismatched)
        let forged = packets.filter { $0.packet.check != OutputPacket.checkValue(sequence: $0.packet.sequence, counter: $0.packet.counter, seed: seed) }
        summary.check("no output released ahead of its checkpoint (S2)",
                      !old.isEmpty && beyond.isEmpty && mismatched.isEmpty && forged.isEmpty && malformed == 0,
                      "\(old.count) packets from the old primary, highest #\(highestOld); the resumed VM stands behind #\(outputSequence); \(beyond.count) beyond it, \(mismatched.count) disagreeing with its history, \(forged.count + malformed) malformed")

        let seqs = new.map(\.packet.sequence)
        let expectedFirst = pending ?? outputSequence + 1
        let contiguous = zip(seqs, seqs.dropFirst()).allSatisfy { $1 == $0 + 1 }
        // Produced before the checkpoint but still held when the primary died.
        let lostAtFailover = expectedFirst - 1 > highestOld ? expectedFirst - 1 - highestOld : 0
        summary.figures["heldPacketsLostAtFailover"] = lostAtFailover
        summary.check("the resumed VM's output continues its own history",
                      !seqs.isEmpty && seqs.first == expectedFirst && contiguous,
                      "new primary sent #\(seqs.first ?? 0)...#\(seqs.last ?? 0) (\(seqs.count) packets), expected to start at #\(expectedFirst); \(lostAtFailover) packets were still held when the primary died (lost as a network may lose them)")
    }

    /// The state letter of a process from /proc (R, S, Z, ...), nil when there is no such process.
    func processState(_ pid: Int32) -> String? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(after: close)...].split(separator: " ").first.map(String.init)
    }

    func progressLine(_ p: [String: Any], elapsed: Double) -> String {
        let pause = p["pauseMicros"] as? [String: Any] ?? [:]
        let commit = p["commitMicros"] as? [String: Any] ?? [:]
        func ms(_ d: [String: Any], _ k: String) -> String { String(format: "%.2f", Double(d[k] as? UInt64 ?? 0) / 1000) }
        let wire = Double(p["wireBytes"] as? Int ?? 0) / 1e6
        return String(format: "  %4.1fs  %5.1f epochs/s  pause p50 %@ ms p99 %@ ms  commit lag p50 %@ ms  wire %.1f MB  ratio %.1f:1  acked #%@  counter %@  held %@",
                      elapsed, p["epochsPerSecond"] as? Double ?? 0, ms(pause, "p50"), ms(pause, "p99"), ms(commit, "p50"), wire,
                      p["compressionRatio"] as? Double ?? 0, "\(p["acknowledged"] ?? 0)", "\(p["counter"] ?? 0)", "\(p["heldPackets"] ?? 0)")
    }

    func failure(_ what: String, log: String) -> DemoFailure {
        let text = (try? String(contentsOf: dir.appendingPathComponent(log), encoding: .utf8)) ?? ""
        let tail = text.split(separator: "\n").suffix(15).joined(separator: "\n")
        return DemoFailure(description: "\(what). Last lines of its log:\n\(tail)")
    }
}
