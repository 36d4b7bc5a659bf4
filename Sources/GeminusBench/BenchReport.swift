import Foundation

/// Everything one `geminus bench` run measured, and its three renderings: a table for people,
/// JSON for scripts, an SVG picture of the pause distribution and the scaling curves.
public struct BenchReport: Sendable {
    public var machine: String
    public var command: String
    public var ramMiB: Int
    public var intervalMillis: Int
    public var guest: [GuestCheckpointBench.Result] = []
    public var migration: [MigrationDowntimeBench.Result] = []
    public var scaling: [CaptureScalingBench.Point] = []
    /// The pipeline on the simulated guest (lightly changed pages: the encode goal's case).
    public var pipeline: (workload: String, ramMiB: Int, pagesPerEpoch: Int, result: PipelineBench.Result)?
    public var link: LinkThroughputBench.Result?
    /// QEMU COLO per dirty window: the primary's pauses, or what went wrong.
    public var colo: [(pagesPerLoop: Int, outcome: ColoAttempt.Outcome)] = []
    /// Why a part did not run (COLO, a method, a size), said in every rendering.
    public var notRun: [String] = []

    public init(machine: String, command: String, ramMiB: Int, intervalMillis: Int) {
        self.machine = machine
        self.command = command
        self.ramMiB = ramMiB
        self.intervalMillis = intervalMillis
    }

    static func ms(_ micros: UInt64) -> String { String(format: "%.2f", Double(micros) / 1000) }

    func coloMedianMillis(_ pagesPerLoop: Int) -> Double? {
        for entry in colo where entry.pagesPerLoop == pagesPerLoop {
            if case .measured(let pauses) = entry.outcome, !pauses.isEmpty { return Double(median(pauses)) / 1000 }
        }
        return nil
    }

    func migrationMedianMillis(_ pagesPerLoop: Int) -> UInt64? {
        migration.first { $0.pagesPerLoop == pagesPerLoop && !$0.downtimeMillis.isEmpty }.map { median($0.downtimeMillis) }
    }

    public var table: String {
        var out: [String] = []
        out.append("Geminus benchmark: \(machine)")
        out.append("command: \(command)")
        out.append("guest: the tiny test guest, \(ramMiB) MiB, QEMU TCG; a checkpoint every \(intervalMillis) ms; commit = pause start to the ack of a secondary thread over authenticated loopback TCP;")
        out.append("output delay = from a moment spread evenly over the epoch to its commit (derived from the measured times: the test guest has no NIC)")
        out.append("")
        out.append("Checkpoints (microseconds unless said; p50 / p99)")
        out.append(Self.row(["method", "pages/epoch", "pause", "stop", "dirty pages", "device state", "cont", "encode", "commit", "output delay", "ratio", "epochs/s", "agent CPU", "guest speed"]))
        for r in guest {
            // The guest's speed against the fastest run of the same dirty window (the faults
            // write tracking adds, the stalls the compare's longer pauses add).
            let fastest = guest.filter { $0.pagesPerLoop == r.pagesPerLoop }.map(\.guestLoopsPerSecond).max() ?? 0
            func pp(_ l: LatencyMicros) -> String { "\(l.p50)/\(l.p99)" }
            out.append(Self.row([r.method.rawValue, String(format: "%.0f", r.pagesPerEpoch), pp(r.pause), pp(r.stop), pp(r.dirtyPages),
                                 pp(r.deviceState), pp(r.cont), pp(r.encode), pp(r.commit), pp(r.outputDelay), String(format: "%.1f:1", r.compressionRatio),
                                 String(format: "%.1f", r.epochsPerSecond), String(format: "%.0f %%", r.agentCPUPercent),
                                 fastest > 0 ? String(format: "%.0f %%", 100 * r.guestLoopsPerSecond / fastest) : "-"]))
        }
        out.append("")
        out.append("Side by side, same guest and dirty window (pause p50 / p99 in ms; ratio = Geminus / QEMU migration downtime)")
        out.append(Self.row(["pages/loop", "QEMU migration downtime", "QEMU COLO", "compare", "write-tracking", "compare/QEMU", "tracking/QEMU", "tracking/COLO", "tracking/compare"]))
        for pages in Array(Set(guest.map(\.pagesPerLoop))).sorted() {
            let c = guest.first { $0.pagesPerLoop == pages && $0.method == .compare }
            let t = guest.first { $0.pagesPerLoop == pages && $0.method == .writeTracking }
            let q = migrationMedianMillis(pages)
            func ratio(_ a: UInt64?, _ b: Double?) -> String {
                guard let a, let b, b > 0 else { return "-" }
                return String(format: "%.2f", Double(a) / 1000 / b)
            }
            let coloPause = coloMedianMillis(pages)
            out.append(Self.row(["\(pages)", q.map { "\($0) ms" } ?? "not run",
                                 coloPause.map { String(format: "%.2f", $0) } ?? (colo.contains { $0.pagesPerLoop == pages } ? "failed" : "not run"),
                                 c.map { "\(Self.ms($0.pause.p50)) / \(Self.ms($0.pause.p99))" } ?? "-",
                                 t.map { "\(Self.ms($0.pause.p50)) / \(Self.ms($0.pause.p99))" } ?? "-",
                                 ratio(c?.pause.p50, q.map { Double($0) }), ratio(t?.pause.p50, q.map { Double($0) }),
                                 ratio(t?.pause.p50, coloPause),
                                 ratio(t?.pause.p50, c.map { Double($0.pause.p50) / 1000 })]))
        }
        if !scaling.isEmpty {
            out.append("")
            out.append("Dirty-page part of the pause against guest RAM (median microseconds, memory of that size in this process)")
            let written = Array(Set(scaling.map(\.pagesWritten))).sorted()
            out.append(Self.row(["RAM MiB"] + written.flatMap { ["compare @\($0)", "tracking @\($0)"] }))
            for size in Array(Set(scaling.map(\.ramMiB))).sorted() {
                var cells = ["\(size)"]
                for w in written {
                    for m in GuestCheckpointBench.Method.allCases {
                        cells.append(scaling.first { $0.ramMiB == size && $0.pagesWritten == w && $0.method == m }.map { "\($0.collectMicros)" } ?? "-")
                    }
                }
                out.append(Self.row(cells))
            }
        }
        if let p = pipeline {
            let r = p.result
            out.append("")
            out.append("Pipeline on the simulated guest (\(p.ramMiB) MiB, \(p.pagesPerEpoch) pages/epoch, \(p.workload) pages), one core")
            out.append(String(format: "  memcpy %.2f GB/s (the limit)  capture %.2f GB/s  encode %.2f GB/s (%.2f of memcpy)  decode+apply %.2f GB/s  compression %.1f:1",
                              r.memcpyGBps, r.captureGBps, r.encodeGBps, r.encodeGBps / max(r.memcpyGBps, 1e-9), r.decodeGBps, r.ratio))
        }
        if let l = link {
            out.append("")
            out.append(String(format: "Pair link on loopback (frames of 256 KiB): sealed (AES-256-GCM, as the agents run) %.2f GB/s; unsealed %.2f GB/s (sealed/unsealed %.2f)",
                              l.geminusBytesPerSecond / 1e9, l.unsealedBytesPerSecond / 1e9, l.geminusBytesPerSecond / max(l.unsealedBytesPerSecond, 1))
                       + (l.iperf3BytesPerSecond.map { String(format: "; iperf3 %.2f GB/s; sealed/iperf3 %.2f", $0 / 1e9, l.geminusBytesPerSecond / $0) }
                          ?? "; iperf3 not run: \(l.iperf3Problem ?? "unknown")"))
            out.append(String(format: "  sealing alone, one core: %.2f GB/s", l.sealBytesPerSecondPerCore / 1e9)
                       + (pipeline.map { p in
                           // Derived, not measured together: one core doing both in turn.
                           String(format: "; encode+seal on one core (derived from the two rates) %.2f GB/s of guest pages",
                                  1 / (1 / max(p.result.encodeGBps, 1e-9) + 1 / max(l.sealBytesPerSecondPerCore / 1e9 * p.result.ratio, 1e-9)))
                       } ?? ""))
        }
        out.append("")
        out.append("Goals (docs/BENCHMARKS.md says where the project stands)")
        let tracked = guest.filter { $0.method == .writeTracking }
        let rate = guest.map(\.epochsPerSecond).min()
        out.append("  40 checkpoints/s sustained: " + (rate.map { String(format: "lowest run %.1f/s at a %d ms interval", $0, intervalMillis) } ?? "not run"))
        out.append("  pause at most half of COLO's at p50 and p99: "
                   + (colo.contains { if case .measured = $0.outcome { return true } else { return false } }
                      ? "see the tracking/COLO column" : "COLO did not run here (see Not run)")
                   + (tracked.isEmpty ? "" : "; tracking p50 " + tracked.map { "\(Self.ms($0.pause.p50)) ms @\(Int($0.pagesPerEpoch))" }.joined(separator: ", ")))
        if let p = pipeline {
            out.append(String(format: "  encode >= 3 GB/s per core, >= 20:1 on lightly changed pages: %.2f GB/s, %.1f:1", p.result.encodeGBps, p.result.ratio))
        }
        if let l = link, let i = l.iperf3BytesPerSecond {
            out.append(String(format: "  pair link (sealed) >= 90 %% of iperf3 on loopback: %.0f %%", 100 * l.geminusBytesPerSecond / i))
        }
        if !notRun.isEmpty {
            out.append("")
            out.append("Not run:")
            for n in notRun { out.append("  - \(n)") }
        }
        return out.joined(separator: "\n")
    }

    static func row(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in i == 0 ? c.padding(toLength: max(16, c.count + 1), withPad: " ", startingAt: 0)
                                                : c.padding(toLength: max(13, c.count + 1), withPad: " ", startingAt: 0) }.joined()
    }

    public var json: [String: Any] {
        [
            "machine": machine, "command": command, "ramMiB": ramMiB, "intervalMillis": intervalMillis,
            "checkpoints": guest.map { r -> [String: Any] in
                ["method": r.method.rawValue, "pagesPerLoop": r.pagesPerLoop, "pagesPerEpoch": r.pagesPerEpoch, "epochs": r.epochs,
                 "pauseMicros": r.pause.summary, "stopMicros": r.stop.summary, "dirtyPagesMicros": r.dirtyPages.summary,
                 "deviceStateMicros": r.deviceState.summary, "contMicros": r.cont.summary, "encodeMicros": r.encode.summary,
                 "commitMicros": r.commit.summary, "outputDelayMicros": r.outputDelay.summary, "wireBytes": r.wireBytes, "inputBytes": r.inputBytes,
                 "compressionRatio": r.compressionRatio, "deviceStateBytes": r.deviceStateBytes,
                 "epochsPerSecond": r.epochsPerSecond, "agentCPUPercent": r.agentCPUPercent, "guestLoopsPerSecond": r.guestLoopsPerSecond]
            },
            "qemuMigration": migration.map { ["pagesPerLoop": $0.pagesPerLoop, "downtimeMillis": $0.downtimeMillis,
                                              "totalMillis": $0.totalMillis, "failures": $0.failures] },
            "scaling": scaling.map { ["method": $0.method.rawValue, "ramMiB": $0.ramMiB, "pagesWritten": $0.pagesWritten,
                                      "collectMicros": $0.collectMicros] },
            "qemuColo": colo.map { entry -> [String: Any] in
                switch entry.outcome {
                case .measured(let pauses): return ["pagesPerLoop": entry.pagesPerLoop, "pausesMicros": pauses]
                case .failed(let why): return ["pagesPerLoop": entry.pagesPerLoop, "failed": why]
                }
            },
            "pipeline": pipeline.map { p -> [String: Any] in
                var j = p.result.json
                j["workload"] = p.workload
                j["ramMiB"] = p.ramMiB
                j["pagesPerEpoch"] = p.pagesPerEpoch
                return j
            } ?? [:],
            "link": link.map { l -> [String: Any] in
                ["geminusBytesPerSecond": l.geminusBytesPerSecond, "unsealedBytesPerSecond": l.unsealedBytesPerSecond,
                 "sealBytesPerSecondPerCore": l.sealBytesPerSecondPerCore, "iperf3BytesPerSecond": l.iperf3BytesPerSecond ?? 0,
                 "iperf3Problem": l.iperf3Problem ?? ""]
            } ?? [:],
            "notRun": notRun,
        ]
    }

    // MARK: Picture

    /// Three panels: the pause distribution (percentile against latency) of each run at the
    /// middle dirty window; pause p50 against pages per epoch with QEMU's migration downtime;
    /// the dirty-page part against guest RAM, log-log, for each method.
    public var svg: String {
        // Legends go under the panels: up to six lines each (two methods x three written counts).
        let w = 1200.0, h = 530.0, panelW = 340.0, panelH = 300.0, top = 70.0
        var parts: [String] = []
        parts.append("<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(w))' height='\(Int(h))' font-family='sans-serif' font-size='12'>")
        parts.append("<rect width='100%' height='100%' fill='white'/>")
        parts.append("<text x='20' y='24' font-size='15'>Geminus benchmark — \(Self.escape(machine))</text>")
        parts.append("<text x='20' y='44' fill='#555'>\(Self.escape(command))</text>")
        let colors: [GuestCheckpointBench.Method: String] = [.compare: "#d62728", .writeTracking: "#1f77b4"]

        // Panel 1: percentile plot of the pause at the middle dirty window.
        let windows = Array(Set(guest.map(\.pagesPerLoop))).sorted()
        let middle = windows.isEmpty ? 0 : windows[windows.count / 2]
        let runs = guest.filter { $0.pagesPerLoop == middle }
        let maxPause = Double(runs.map { $0.pause.max }.max() ?? 1) / 1000
        var p1 = Panel(x: 50, y: top, width: panelW, height: panelH, title: "pause distribution, \(middle) pages/loop",
                       xLabel: "percentile", yLabel: "pause ms", xLog: false, yLog: false, xRange: (0, 100), yRange: (0, max(maxPause, 1)))
        for r in runs {
            let pts = stride(from: 0.0, through: 100.0, by: 1.0).map { ($0, Double(r.pause.percentile(min($0, 99.99))) / 1000) }
            p1.line(pts, color: colors[r.method]!, label: r.method.rawValue)
        }
        parts.append(p1.render())

        // Panel 2: pause p50 against pages per epoch, with migration downtime.
        let maxY = max(1.0, (guest.map { Double($0.pause.p50) / 1000 } + migration.compactMap { $0.downtimeMillis.isEmpty ? nil : Double(median($0.downtimeMillis)) }).max() ?? 1)
        var p2 = Panel(x: 450, y: top, width: panelW, height: panelH, title: "pause p50 against dirty pages",
                       xLabel: "pages per epoch", yLabel: "ms", xLog: true, yLog: false,
                       xRange: (max(1, Double(windows.first ?? 1) / 2), Double(windows.last ?? 10) * 2), yRange: (0, maxY * 1.1))
        for m in GuestCheckpointBench.Method.allCases {
            let pts = guest.filter { $0.method == m }.map { (max(1, $0.pagesPerEpoch), Double($0.pause.p50) / 1000) }.sorted { $0.0 < $1.0 }
            if !pts.isEmpty { p2.line(pts, color: colors[m]!, label: "Geminus \(m.rawValue)") }
        }
        let mig = migration.compactMap { r in r.downtimeMillis.isEmpty ? nil : (Double(r.pagesPerLoop), Double(median(r.downtimeMillis))) }
        if !mig.isEmpty { p2.line(mig, color: "#2ca02c", label: "QEMU migration downtime") }
        parts.append(p2.render())

        // Panel 3: dirty-page part against RAM, log-log, at each pages-written value.
        let sizes = scaling.map { Double($0.ramMiB) }
        let ys = scaling.map { max(1, Double($0.collectMicros)) / 1000 }
        var p3 = Panel(x: 850, y: top, width: panelW, height: panelH, title: "dirty-page part against guest RAM",
                       xLabel: "guest RAM MiB", yLabel: "ms", xLog: true, yLog: true,
                       xRange: ((sizes.min() ?? 64) / 1.5, (sizes.max() ?? 4096) * 1.5), yRange: ((ys.min() ?? 0.01) / 2, (ys.max() ?? 100) * 2))
        for m in GuestCheckpointBench.Method.allCases {
            for wr in Array(Set(scaling.map(\.pagesWritten))).sorted() {
                let pts = scaling.filter { $0.method == m && $0.pagesWritten == wr }
                    .map { (Double($0.ramMiB), max(1, Double($0.collectMicros)) / 1000) }.sorted { $0.0 < $1.0 }
                if !pts.isEmpty { p3.line(pts, color: colors[m]!, label: "\(m.rawValue), \(wr) written", dashed: wr != scaling.map(\.pagesWritten).max()) }
            }
        }
        parts.append(p3.render())
        parts.append("</svg>")
        return parts.joined(separator: "\n") + "\n"
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "'", with: "&apos;")
    }
}

/// One chart: axes with a few ticks, lines with a legend.
struct Panel {
    let x, y, width, height: Double
    let title, xLabel, yLabel: String
    let xLog, yLog: Bool
    let xRange, yRange: (Double, Double)
    private var lines: [(points: [(Double, Double)], color: String, label: String, dashed: Bool)] = []

    init(x: Double, y: Double, width: Double, height: Double, title: String, xLabel: String, yLabel: String,
         xLog: Bool, yLog: Bool, xRange: (Double, Double), yRange: (Double, Double)) {
        self.x = x; self.y = y; self.width = width; self.height = height
        self.title = title; self.xLabel = xLabel; self.yLabel = yLabel
        self.xLog = xLog; self.yLog = yLog
        self.xRange = (xLog ? max(xRange.0, 1e-9) : xRange.0, max(xRange.1, xRange.0 + 1e-9))
        self.yRange = (yLog ? max(yRange.0, 1e-9) : yRange.0, max(yRange.1, yRange.0 + 1e-9))
    }

    mutating func line(_ points: [(Double, Double)], color: String, label: String, dashed: Bool = false) {
        lines.append((points, color, label, dashed))
    }

    func px(_ v: Double) -> Double {
        let (a, b) = xLog ? (log10(xRange.0), log10(xRange.1)) : xRange
        let t = ((xLog ? log10(max(v, 1e-9)) : v) - a) / (b - a)
        return x + t * width
    }

    func py(_ v: Double) -> Double {
        let (a, b) = yLog ? (log10(yRange.0), log10(yRange.1)) : yRange
        let t = ((yLog ? log10(max(v, 1e-9)) : v) - a) / (b - a)
        return y + height - t * height
    }

    func ticks(_ range: (Double, Double), log: Bool) -> [Double] {
        if log {
            var out: [Double] = []
            var v = pow(10, floor(log10(range.0)))
            while v <= range.1 { if v >= range.0 { out.append(v) }; v *= 10 }
            return out
        }
        return (0...4).map { range.0 + (range.1 - range.0) * Double($0) / 4 }
    }

    func render() -> String {
        func f(_ v: Double) -> String { String(format: "%.1f", v) }
        func label(_ v: Double) -> String { v >= 100 || v == v.rounded() ? String(format: "%.0f", v) : String(format: "%.2g", v) }
        var s = "<g>"
        s += "<text x='\(f(x))' y='\(f(y - 10))' font-size='13'>\(BenchReport.escape(title))</text>"
        s += "<rect x='\(f(x))' y='\(f(y))' width='\(f(width))' height='\(f(height))' fill='none' stroke='#999'/>"
        for t in ticks(xRange, log: xLog) {
            s += "<line x1='\(f(px(t)))' y1='\(f(y + height))' x2='\(f(px(t)))' y2='\(f(y + height + 4))' stroke='#999'/>"
            s += "<text x='\(f(px(t)))' y='\(f(y + height + 16))' text-anchor='middle' fill='#555'>\(label(t))</text>"
        }
        for t in ticks(yRange, log: yLog) {
            s += "<line x1='\(f(x - 4))' y1='\(f(py(t)))' x2='\(f(x))' y2='\(f(py(t)))' stroke='#999'/>"
            s += "<text x='\(f(x - 6))' y='\(f(py(t) + 4))' text-anchor='end' fill='#555'>\(label(t))</text>"
        }
        s += "<text x='\(f(x + width / 2))' y='\(f(y + height + 32))' text-anchor='middle'>\(BenchReport.escape(xLabel))</text>"
        s += "<text x='\(f(x + 4))' y='\(f(y + 14))' fill='#555'>\(BenchReport.escape(yLabel))</text>"
        for (i, l) in lines.enumerated() {
            let pts = l.points.map { "\(f(px($0.0))),\(f(py($0.1)))" }.joined(separator: " ")
            s += "<polyline points='\(pts)' fill='none' stroke='\(l.color)' stroke-width='2'\(l.dashed ? " stroke-dasharray='5,4'" : "")/>"
            for p in l.points where l.points.count < 12 {
                s += "<circle cx='\(f(px(p.0)))' cy='\(f(py(p.1)))' r='3' fill='\(l.color)'/>"
            }
            let ly = y + height + 52 + Double(i) * 15
            s += "<line x1='\(f(x))' y1='\(f(ly - 4))' x2='\(f(x + 18))' y2='\(f(ly - 4))' stroke='\(l.color)' stroke-width='2'\(l.dashed ? " stroke-dasharray='5,4'" : "")/>"
            s += "<text x='\(f(x + 22))' y='\(f(ly))' font-size='11'>\(BenchReport.escape(l.label))</text>"
        }
        return s + "</g>"
    }
}
