/// A scenario: a story of commands run against one simulated pair, and the event log it must
/// produce (etcd raft's testdata, Proxmox HA's scenario directories). The file format:
///
///     # A comment says what the story shows.
///     seed 7
///     run 300ms
///     crash primary during send
///     run 400ms
///     expect took-over
///     ----
///     (the expected log: each command as "> command", then the notable events it caused)
///
/// Commands: `seed N`, then optionally `arbitration none` (the witness arbitrates unless a
/// story shows what happens without it), `run 300ms|2s`, `crash primary before capture|during capture|after
/// capture|during send|after send|after ack`, `crash secondary`, `restart secondary`,
/// `stop primary` (an ordinary stop of its agent, as SIGTERM), `switchover` (a planned one, as
/// `geminus failover`), `forge handover` (a handover frame the primary never sent reaches the secondary), `restart primary` (its agent is
/// killed and starts again while its guest runs on), `hang secondary` / `unhang secondary`
/// (its apply loop stops while its link still heartbeats), `standby down` / `standby up` (what the
/// secondary's standby health watch reports), `fail primary capture|resume|capture and resume` (its next one),
/// `partition primary secondary` (both ways), `partition primary -> secondary` (one way),
/// `heal`, `partition primary witness`, `partition secondary witness`, `heal witness` (both links), `heal primary|secondary witness`, `freeze primary 400ms`, `slow secondary 16KiB/ms`, `wall-clock jump -3600s`,
/// `corrupt|duplicate|reorder|lose next N frames`, `corrupt next frame at byte 10`, `link delay 5ms..20ms`, and
/// `expect took-over|no-takeover|protected|unprotected|no-violations|known-gap S1|stale-refused|resynced|backpressure|secondary following|self-fenced|cannot-take-over`.
public struct Scenario: Sendable {
    public var name: String
    public var commands: [String]
    public var expectedLog: [String]

    public static let separator = "----"

    public init(name: String, text: String) {
        self.name = name
        var commands: [String] = []
        var expected: [String] = []
        var inLog = false
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            let line = String(raw)
            if inLog {
                expected.append(line)
            } else if line.trimmed() == Self.separator {
                inLog = true
            } else {
                let t = line.trimmed()
                if !t.isEmpty && !t.hasPrefix("#") { commands.append(t) }
            }
        }
        while expected.last?.isEmpty == true { expected.removeLast() }
        self.name = name
        self.commands = commands
        expectedLog = expected
    }

    /// The file's text with `log` as its expected log (to rewrite a scenario after a reviewed change).
    public static func rewrite(_ text: String, log: [String]) -> String {
        var head: [Substring] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.trimmingCharacters() == separator { break }
            head.append(line)
        }
        while head.last?.trimmingCharacters().isEmpty == true { head.removeLast() }
        return head.joined(separator: "\n") + "\n" + separator + "\n" + log.joined(separator: "\n") + "\n"
    }

    public struct Outcome: Sendable {
        public var log: [String]
        /// Expectations that did not hold, and commands that could not be understood.
        public var failures: [String]
        public var result: RunResult
    }

    /// Runs the story. Never traps on a bad line: it is reported with what was expected.
    public func run() throws -> Outcome {
        var seed: UInt64 = 1
        var rest = commands[...]
        if let first = rest.first, first.hasPrefix("seed ") {
            guard let s = UInt64(first.dropFirst(5).trimmingCharacters()) else {
                throw SimulationError("\(name): bad seed line '\(first)'", fix: "write `seed 7`")
            }
            seed = s
            rest = rest.dropFirst()
        }
        var config = SimulationConfig(seed: seed)
        config.durationNanos = UInt64.max
        if rest.first == "arbitration none" {
            config.setArbitration(.none)
            rest = rest.dropFirst()
        }
        let sim = try PairSimulator(config: config)
        var log: [String] = []
        var failures: [String] = []
        var shown = 0
        func flush() {
            for e in sim.trace[shown...] where e.notable { log.append(e.line) }
            shown = sim.trace.count
        }
        flush()
        for command in rest {
            log.append("> \(command)")
            if let problem = apply(command, to: sim) {
                failures.append("\(command): \(problem)")
                log.append("  FAILED: \(problem)")
            }
            flush()
        }
        return Outcome(log: log, failures: failures, result: sim.result())
    }

    /// One command; nil when it ran (or its expectation held), else what went wrong.
    func apply(_ command: String, to sim: PairSimulator) -> String? {
        let words = command.split(separator: " ").map(String.init)
        func duration(_ s: String) -> UInt64? {
            if s.hasSuffix("ms"), let n = UInt64(s.dropLast(2)) { return n * 1_000_000 }
            if s.hasSuffix("s"), let n = UInt64(s.dropLast(1)) { return n * 1_000_000_000 }
            return nil
        }
        switch (words.first ?? "", words.count) {
        case ("run", 2):
            guard let d = duration(words[1]) else { return "expected a duration such as 300ms or 2s" }
            sim.run(forNanos: d)
        case ("crash", _) where words.count >= 2 && words[1] == "primary":
            let point = words.dropFirst(2).joined(separator: "-")
            guard let p = CrashPoint(rawValue: point) else {
                return "crash point must be one of: \(CrashPoint.allCases.map { $0.rawValue.replacingDashes() }.joined(separator: ", "))"
            }
            sim.inject(.crashPrimary(p))
        case ("crash", 2) where words[1] == "secondary":
            sim.inject(.crashSecondary)
        case ("restart", 2) where words[1] == "secondary":
            sim.inject(.restartSecondary)
        case ("restart", 2) where words[1] == "primary":
            sim.restartPrimaryAgent()
        case ("stop", 2) where words[1] == "primary":
            sim.stopPrimary()
        case ("switchover", 1):
            sim.requestSwitchover()
        case ("forge", 2) where words[1] == "handover":
            sim.forgeHandover()
        case ("hang", 2) where words[1] == "secondary":
            sim.hangSecondaryApply(true)
        case ("unhang", 2) where words[1] == "secondary":
            sim.hangSecondaryApply(false)
        case ("fail", _) where words.count >= 3 && words[1] == "primary":
            let what = Set(words.dropFirst(2).filter { $0 != "and" })
            guard !what.isEmpty, what.isSubset(of: ["capture", "resume"]) else { return "write `fail primary capture`, `fail primary resume` or `fail primary capture and resume`" }
            sim.failPrimaryNext(capture: what.contains("capture"), resume: what.contains("resume"))
        case ("standby", 2) where words[1] == "down" || words[1] == "up":
            sim.setStandbyDown(words[1] == "down")
        case ("partition", 3) where words[1] == "primary" && words[2] == "secondary":
            sim.inject(.partition(primaryToSecondaryOnly: nil))
        case ("partition", 4) where words[2] == "->":
            switch (words[1], words[3]) {
            case ("primary", "secondary"): sim.inject(.partition(primaryToSecondaryOnly: true))
            case ("secondary", "primary"): sim.inject(.partition(primaryToSecondaryOnly: false))
            default: return "write `partition primary -> secondary` or `partition secondary -> primary`"
            }
        case ("heal", 1):
            sim.inject(.heal)
        case ("partition", 3) where words[2] == "witness" && (words[1] == "primary" || words[1] == "secondary"):
            sim.inject(.cutWitness(fromPrimary: words[1] == "primary"))
        case ("heal", 2) where words[1] == "witness":
            sim.inject(.healWitness)
        case ("heal", 3) where words[2] == "witness" && (words[1] == "primary" || words[1] == "secondary"):
            sim.healWitnessLink(fromPrimary: words[1] == "primary")
        case ("freeze", 3) where words[1] == "primary":
            guard let d = duration(words[2]) else { return "expected a duration such as 400ms" }
            sim.inject(.freezePrimary(forNanos: d))
        case ("slow", 3) where words[1] == "secondary":
            guard words[2].hasSuffix("KiB/ms"), let n = Int(words[2].dropLast(6)), n > 0 else { return "write a rate such as 16KiB/ms" }
            sim.inject(.slowSecondary(bytesPerMilli: n << 10))
        case ("wall-clock", 3) where words[1] == "jump":
            var w = words[2]
            let negative = w.hasPrefix("-")
            if negative || w.hasPrefix("+") { w.removeFirst() }
            guard let d = duration(w) else { return "write a jump such as -3600s or +86400s" }
            sim.inject(.jumpWallClock(byNanos: negative ? -Int64(d) : Int64(d)))
        case ("corrupt", 6) where words[1] == "next" && words[2] == "frame" && words[3] == "at" && words[4] == "byte":
            // "corrupt next frame at byte 10": a bit of that byte (8-11 are the length field).
            guard let b = Int(words[5]), b >= 0 else { return "the byte offset must be a non-negative integer" }
            sim.faultNextFrames(corrupt: 1, atByte: b)
        case ("corrupt", _), ("duplicate", _), ("reorder", _), ("lose", _):
            // "corrupt next frame" or "duplicate next 3 frames"
            guard words.count >= 3, words[1] == "next" else { return "write `\(words[0]) next frame` or `\(words[0]) next 3 frames`" }
            let n = words.count == 4 ? Int(words[2]) : 1
            guard let n, n > 0 else { return "the number of frames must be a positive integer" }
            switch words[0] {
            case "corrupt": sim.faultNextFrames(corrupt: n)
            case "duplicate": sim.faultNextFrames(duplicate: n)
            case "reorder": sim.faultNextFrames(reorder: n)
            default: sim.faultNextFrames(lose: n)
            }
        case ("link", 3) where words[1] == "delay":
            let parts = words[2].split(separator: ".", omittingEmptySubsequences: true).map(String.init)
            guard parts.count == 2, let lo = duration(parts[0]), let hi = duration(parts[1]), lo <= hi else { return "write `link delay 5ms..20ms`" }
            var f = LinkFaults()
            f.delayMinNanos = lo
            f.delayMaxNanos = hi
            sim.setLinkFaults(f)
        case ("expect", _):
            return expect(words.dropFirst().joined(separator: " "), sim)
        default:
            return "unknown command (see Scenario's documentation for the list)"
        }
        return nil
    }

    func expect(_ what: String, _ sim: PairSimulator) -> String? {
        let r = sim.result()
        switch what {
        case "took-over":
            return sim.isTakenOver ? nil : "the secondary has not taken over"
        case "no-takeover":
            return sim.isTakenOver ? "the secondary took over" : nil
        case "protected":
            return sim.primaryProtection == .protected ? nil : "the primary is \(sim.primaryProtection.map { "\($0)" } ?? "dead"), not protected"
        case "unprotected":
            return sim.primaryProtection == .unprotected ? nil : "the primary is \(sim.primaryProtection.map { "\($0)" } ?? "dead"), not unprotected"
        case "no-violations":
            return r.violations.isEmpty ? nil : "violations: \(r.violations.map(\.description).joined(separator: "; "))"
        case "stale-refused":
            return r.staleFramesRefused + r.staleDialsRefused > 0 ? nil : "nothing of the deposed primary was refused"
        case "resynced":
            return r.resyncs > 0 || r.fullCheckpoints > 1 ? nil : "no resynchronisation happened"
        case "backpressure":
            let b = sim.backpressure
            sim.note("check", "backpressure: \(b.deferredEpochs) epochs deferred, guest stalled \(b.guestStalls) times, send queue peak \(b.peakSendQueueBytes >> 10) KiB, link peak \(b.peakLinkBytes >> 10) KiB of \(sim.config.linkCapacityBytes >> 10) KiB", notable: true)
            return b.deferredEpochs > 0 || b.guestStalls > 0 ? nil : "no backpressure: nothing was deferred or stalled"
        case "self-fenced":
            return r.selfFences > 0 ? nil : "the primary did not fence itself"
        case "cannot-take-over":
            return sim.result().trace.contains { $0.text.hasPrefix("CANNOT TAKE OVER") } ? nil : "the secondary never said it cannot take over"
        case "secondary following":
            return sim.secondaryState == .following ? nil : "the secondary is \(sim.secondaryState.map { "\($0)" } ?? "dead")"
        default:
            if what.hasPrefix("known-gap "), let p = Promise(rawValue: String(what.dropFirst(10))) {
                return r.knownGaps.contains { $0.promise == p } ? nil : "no known gap for \(p.rawValue) was recorded"
            }
            return "unknown expectation '\(what)'"
        }
    }
}

extension String {
    func replacingDashes() -> String { String(map { $0 == "-" ? " " : $0 }) }
}
