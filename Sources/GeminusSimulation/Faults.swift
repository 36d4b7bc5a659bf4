/// The kinds of fault the simulator injects. Names are what `--faults` takes.
public enum FaultKind: String, CaseIterable, Sendable, Comparable, Codable {
    /// The primary's host dies at a chosen point of an epoch (see `CrashPoint`).
    case primaryCrash = "primary-crash"
    /// The secondary's host dies; it restarts empty after a while.
    case secondaryCrash = "secondary-crash"
    /// Link latency up to tens of milliseconds.
    case delay
    /// Some frames are held back past later ones.
    case reorder
    /// Some frames arrive twice.
    case duplicate
    /// Some frames never arrive.
    case loss
    /// Both directions cut for a while, then healed.
    case partition
    /// One direction cut for a while, then healed.
    case oneWayPartition = "one-way-partition"
    /// A bit flipped in some frames.
    case corruption
    /// The primary's host freezes (a stop-the-world pause, SIGSTOP) past the takeover bound,
    /// then thaws and carries on sending as if nothing happened.
    case stalePrimary = "stale-primary"
    /// The secondary reads slowly: the link fills and backpressure must hold.
    case slowSecondary = "slow-secondary"
    /// The wall clock jumps by up to a day either way.
    case wallClockJump = "wall-clock-jump"
    /// One host of the pair loses the witness for a while (with a partition of the pair in the
    /// same run: "witness lost, then the pair partitioned", or a primary cut off from everything).
    /// Kept last: the planner splits one random stream per kind in this order.
    case witnessLoss = "witness-loss"

    public static func < (a: FaultKind, b: FaultKind) -> Bool { a.rawValue < b.rawValue }

    /// Faults that isolate a primary that is still alive. Without arbitration the secondary
    /// takes over anyway after the silence bound, so two copies run: a known gap of such runs.
    public var isolatesLivePrimary: Bool {
        self == .partition || self == .oneWayPartition || self == .stalePrimary
    }

    /// Parses a comma-separated list ("all" for every kind), naming the bad entry and the choices.
    public static func parseList(_ text: String) throws(SimulationError) -> Set<FaultKind> {
        var out = Set<FaultKind>()
        for part in text.split(separator: ",").map({ $0.trimmingCharacters() }) where !part.isEmpty {
            if part == "all" { out.formUnion(FaultKind.allCases); continue }
            if part == "none" { continue }
            guard let k = FaultKind(rawValue: part) else {
                throw SimulationError("unknown fault kind '\(part)'",
                                      fix: "use a comma-separated list of: all, none, \(FaultKind.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            out.insert(k)
        }
        return out
    }
}

/// Where in an epoch the primary's host dies.
public enum CrashPoint: String, CaseIterable, Sendable, Codable {
    /// The epoch is due and asked for; the guest has not been paused yet.
    case beforeCapture = "before-capture"
    /// The guest is paused and its pages copied; the machine has not heard that capture finished.
    case duringCapture = "during-capture"
    /// Captured and the guest resumed; nothing of the epoch encoded or sent.
    case afterCapture = "after-capture"
    /// Part of the epoch's frames are on the link, the rest die with the host.
    case duringSend = "during-send"
    /// Every frame of the epoch has left; its acknowledgement has not come back.
    case afterSend = "after-send"
    /// The acknowledgement arrived; the output it frees has not been released.
    case afterAck = "after-ack"
}

/// A run's problem with its input, with the cause and what to do.
public struct SimulationError: Error, Sendable, CustomStringConvertible, Equatable {
    public var message: String
    public var fix: String?
    public init(_ message: String, fix: String? = nil) {
        self.message = message
        self.fix = fix
    }
    public var description: String { fix.map { "\(message); \($0)" } ?? message }
}

extension Substring {
    func trimmingCharacters() -> String {
        String(self.drop(while: { $0 == " " || $0 == "\t" }).reversed().drop(while: { $0 == " " || $0 == "\t" || $0 == "\r" }).reversed())
    }
}

extension String {
    func trimmed() -> String { self[...].trimmingCharacters() }
}

/// One scheduled fault: at `atNanos`, do `what`.
public struct ScheduledFault: Sendable, Equatable {
    public enum What: Sendable, Equatable {
        case crashPrimary(CrashPoint)
        case crashSecondary
        case restartSecondary
        /// Cut both directions (`oneWay == nil`) or only primary→secondary (true) / secondary→primary (false).
        case partition(primaryToSecondaryOnly: Bool?)
        case heal
        case freezePrimary(forNanos: UInt64)
        /// Cut the witness off from the primary's host (true) or the secondary's.
        case cutWitness(fromPrimary: Bool)
        case healWitness
        case slowSecondary(bytesPerMilli: Int)
        case jumpWallClock(byNanos: Int64)
    }
    public var atNanos: UInt64
    public var what: What

    public init(atNanos: UInt64, what: What) {
        self.atNanos = atNanos
        self.what = what
    }
}

/// Draws a run's faults from its seed: which kinds are on (VOPR-style, a random subset of the
/// enabled ones, so runs with few faults are common too), link fault rates, and the schedule.
public enum FaultPlanner {
    public static func plan(enabled: Set<FaultKind>, config: SimulationConfig, rng base: SimulationRandom) -> (LinkFaults, LinkFaults, [ScheduledFault], Set<FaultKind>) {
        var rng = base
        // One stream per kind, always split in the same order (see SimulationRandom).
        var streams: [FaultKind: SimulationRandom] = [:]
        for k in FaultKind.allCases { streams[k] = rng.split() }
        var chosen = Set<FaultKind>()
        for k in FaultKind.allCases where enabled.contains(k) {
            // Each enabled kind is on in about two runs of three.
            if enabled.count == 1 || streams[k]!.uniform(0...2) > 0 { chosen.insert(k) }
        }
        var toSecondary = LinkFaults()
        var toPrimary = LinkFaults()
        var schedule: [ScheduledFault] = []
        let end = config.durationNanos
        let ms: UInt64 = 1_000_000
        func with(_ k: FaultKind, _ body: (inout SimulationRandom) -> Void) {
            guard chosen.contains(k) else { return }
            body(&streams[k]!)
        }
        with(.delay) { r in
            for i in 0..<2 {
                let lo = r.uniform(0...5) * ms
                let hi = lo + r.uniform(1...30) * ms
                if i == 0 { toSecondary.delayMinNanos = lo; toSecondary.delayMaxNanos = hi }
                else { toPrimary.delayMinNanos = lo; toPrimary.delayMaxNanos = hi }
            }
        }
        with(.reorder) { r in toSecondary.reorderPerMillion = r.uniform(1_000...20_000); toPrimary.reorderPerMillion = r.uniform(1_000...20_000) }
        with(.duplicate) { r in toSecondary.duplicatePerMillion = r.uniform(1_000...20_000); toPrimary.duplicatePerMillion = r.uniform(1_000...20_000) }
        with(.loss) { r in toSecondary.lossPerMillion = r.uniform(500...10_000); toPrimary.lossPerMillion = r.uniform(500...10_000) }
        with(.corruption) { r in toSecondary.corruptPerMillion = r.uniform(500...10_000); toPrimary.corruptPerMillion = r.uniform(0...5_000) }
        with(.primaryCrash) { r in
            let point = CrashPoint.allCases[Int(r.uniform(0...UInt64(CrashPoint.allCases.count - 1)))]
            schedule.append(.init(atNanos: r.uniform(150...max(151, end / ms * 6 / 10)) * ms, what: .crashPrimary(point)))
        }
        with(.secondaryCrash) { r in
            let at = r.uniform(100...max(101, end / ms / 2)) * ms
            schedule.append(.init(atNanos: at, what: .crashSecondary))
            schedule.append(.init(atNanos: at + r.uniform(20...600) * ms, what: .restartSecondary))
        }
        with(.partition) { r in
            let at = r.uniform(100...max(101, end / ms * 6 / 10)) * ms
            schedule.append(.init(atNanos: at, what: .partition(primaryToSecondaryOnly: nil)))
            schedule.append(.init(atNanos: at + r.uniform(20...500) * ms, what: .heal))
        }
        with(.oneWayPartition) { r in
            let at = r.uniform(100...max(101, end / ms * 6 / 10)) * ms
            schedule.append(.init(atNanos: at, what: .partition(primaryToSecondaryOnly: r.uniform(0...1) == 0)))
            schedule.append(.init(atNanos: at + r.uniform(20...500) * ms, what: .heal))
        }
        with(.stalePrimary) { r in
            let at = r.uniform(100...max(101, end / ms / 2)) * ms
            schedule.append(.init(atNanos: at, what: .freezePrimary(forNanos: config.secondary.takeoverAfterNanos + r.uniform(50...400) * ms)))
        }
        with(.witnessLoss) { r in
            let at = r.uniform(50...max(51, end / ms * 6 / 10)) * ms
            schedule.append(.init(atNanos: at, what: .cutWitness(fromPrimary: r.uniform(0...1) == 0)))
            schedule.append(.init(atNanos: at + r.uniform(50...1_500) * ms, what: .healWitness))
        }
        with(.slowSecondary) { r in
            schedule.append(.init(atNanos: r.uniform(0...max(1, end / ms / 2)) * ms, what: .slowSecondary(bytesPerMilli: Int(r.uniform(8...64)) << 10)))
        }
        with(.wallClockJump) { r in
            for _ in 0..<r.uniform(1...4) {
                let magnitude = Int64(r.uniform(1...86_400)) * 1_000_000_000
                schedule.append(.init(atNanos: r.uniform(1...max(2, end / ms - 1)) * ms, what: .jumpWallClock(byNanos: r.uniform(0...1) == 0 ? magnitude : -magnitude)))
            }
        }
        // Stable order: by time, then by the order drawn.
        schedule = schedule.enumerated().sorted { ($0.element.atNanos, $0.offset) < ($1.element.atNanos, $1.offset) }.map(\.element)
        return (toSecondary, toPrimary, schedule, chosen)
    }
}
