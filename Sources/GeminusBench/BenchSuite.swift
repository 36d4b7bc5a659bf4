import Foundation
import GeminusCore
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// The whole of `geminus bench`: checkpoints per dirty window and method, QEMU's own live
/// migration and COLO beside them, the pipeline, the pair link, and the dirty-page part against
/// guest RAM; what cannot run is said in the report's `notRun`. Writes the SVG picture.
public struct BenchSuite: Sendable {
    public var kernelPath: String
    public var ramMiB: Int
    public var intervalMillis: Int
    public var epochs: Int
    /// Dirty windows: pages the guest rewrites in its loop.
    public var windows: [Int]
    public var guestOptions: String
    public var methods: [GuestCheckpointBench.Method]
    /// QEMU live migrations per dirty window (0: none).
    public var migrationRuns: Int
    public var colo: Bool
    /// Guest RAM sizes in MiB for the scaling curves.
    public var scalingSizes: [Int]
    public var scalingPages: [Int]
    public var pipeline: Bool
    /// Seconds of the pair-link run (0: none).
    public var linkSeconds: Double
    /// Where the picture is written.
    public var svgPath: String
    /// The command line, for the report.
    public var command: String

    public init(kernelPath: String, ramMiB: Int, intervalMillis: Int, epochs: Int, windows: [Int], guestOptions: String,
                methods: [GuestCheckpointBench.Method], migrationRuns: Int, colo: Bool, scalingSizes: [Int], scalingPages: [Int],
                pipeline: Bool, linkSeconds: Double, svgPath: String, command: String) {
        self.kernelPath = kernelPath
        self.ramMiB = ramMiB
        self.intervalMillis = intervalMillis
        self.epochs = epochs
        self.windows = windows
        self.guestOptions = guestOptions
        self.methods = methods
        self.migrationRuns = migrationRuns
        self.colo = colo
        self.scalingSizes = scalingSizes
        self.scalingPages = scalingPages
        self.pipeline = pipeline
        self.linkSeconds = linkSeconds
        self.svgPath = svgPath
        self.command = command
    }

    /// Runs every part, saying progress through `say`, and returns the report (the picture is
    /// written to `svgPath`).
    public func run(say: (String) -> Void) -> BenchReport {
        var chosen = methods
        var report = BenchReport(machine: Self.machineDescription(), command: command, ramMiB: ramMiB, intervalMillis: intervalMillis)
        if chosen.contains(.writeTracking) {
            var why: GeminusError? = WriteTrackingFinder.probe()
            if why == nil { do { _ = try WriteTrackingPreload.require() } catch { why = error } }
            if let why {
                report.notRun.append("write-tracking: \(why.message)\(why.fix.map { " (fix: \($0))" } ?? "")")
                chosen.removeAll { $0 == .writeTracking }
            }
        }
        var sizes = scalingSizes
        let available = Self.memAvailableBytes()
        for s in sizes where CaptureScalingBench.bytesNeeded(ramMiB: s) + (1 << 30) > available {
            report.notRun.append("scaling at \(s) MiB: needs about \(CaptureScalingBench.bytesNeeded(ramMiB: s) >> 20) MiB of memory, \(available >> 20) MiB available")
        }
        sizes.removeAll { CaptureScalingBench.bytesNeeded(ramMiB: $0) + (1 << 30) > available }

        // Bounded in time, and said up front.
        let guestSeconds = Double(windows.count * chosen.count) * (1.5 + Double(epochs * intervalMillis) / 1000)
        let migrationSeconds = Double(windows.count * migrationRuns) * 2.5 + (colo ? 9 * Double(windows.count) : 0)
        let scalingSeconds = sizes.reduce(0.0) { $0 + 3 * Double($1) / 700 + 1 } + (pipeline ? 4 : 0) + 2 * linkSeconds + 1
        say(String(format: "geminus bench: about %.0f s (checkpoints %.0f s, QEMU migration %.0f s, scaling %.0f s)",
                   guestSeconds + migrationSeconds + scalingSeconds, guestSeconds, migrationSeconds, scalingSeconds))
        let start = Date()
        func elapsed() -> String { String(format: "%5.0fs", Date().timeIntervalSince(start)) }

        let guestBench = GuestCheckpointBench(kernelPath: kernelPath, ramMiB: ramMiB, intervalMillis: intervalMillis, epochs: epochs,
                                              guestOptions: guestOptions)
        for w in windows {
            for m in chosen {
                say("\(elapsed())  checkpoints: \(m.rawValue), \(w) pages/loop, \(epochs) epochs")
                do {
                    let r = try guestBench.run(m, pagesPerLoop: w)
                    say("\(elapsed())    pause p50 \(r.pause.p50) us, p99 \(r.pause.p99) us, \(String(format: "%.0f", r.pagesPerEpoch)) pages/epoch")
                    report.guest.append(r)
                } catch {
                    report.notRun.append("checkpoints with \(m.rawValue) at \(w) pages/loop: \(error.message)")
                }
            }
            if migrationRuns > 0 {
                say("\(elapsed())  QEMU live migration: \(w) pages/loop, \(migrationRuns) runs")
                let r = MigrationDowntimeBench(kernelPath: kernelPath, ramMiB: ramMiB, runs: migrationRuns, guestOptions: guestOptions).run(pagesPerLoop: w)
                for f in r.failures { report.notRun.append("a QEMU migration at \(w) pages/loop: \(f)") }
                report.migration.append(r)
            }
            if colo {
                // Once COLO has failed one way, the other windows would only repeat it.
                if let earlier = report.colo.first, case .failed(let why) = earlier.outcome {
                    report.colo.append((w, .failed(why)))
                } else {
                    say("\(elapsed())  QEMU COLO: \(w) pages/loop")
                    let outcome = ColoAttempt(kernelPath: kernelPath, ramMiB: ramMiB, guestOptions: guestOptions).run(pagesPerLoop: w)
                    if case .failed(let why) = outcome {
                        report.notRun.append("QEMU COLO: \(why). For orientation only (not this run, notes/colo.md with the shim): primary pause median 3.7 ms at 55 dirty pages, 6.1 at 530, 11.9 at 4,200, 19.9 at 8,194 per 100 ms checkpoint")
                    }
                    report.colo.append((w, outcome))
                }
            }
        }
        if pipeline {
            say("\(elapsed())  pipeline: simulated guest, 256 MiB, 2000 pages/epoch, small edits")
            do {
                let r = try PipelineBench(ramMiB: 256, pagesPerEpoch: 2000, epochs: 200).measure(.smallEdits)
                report.pipeline = ("small edits", 256, 2000, r)
            } catch {
                report.notRun.append("the pipeline: \(error.message)")
            }
        }
        if linkSeconds > 0 {
            say("\(elapsed())  pair link on loopback, \(linkSeconds) s, then iperf3")
            do {
                report.link = try LinkThroughputBench(seconds: linkSeconds).run()
            } catch {
                report.notRun.append("the pair link: \(error.message)")
            }
        }
        let scaling = CaptureScalingBench(sizesMiB: sizes, pagesWritten: scalingPages, repetitions: 7)
        for s in sizes {
            do {
                report.scaling += try scaling.run(ramMiB: s) { say("\(elapsed())  \($0)") }
            } catch {
                report.notRun.append("scaling at \(s) MiB: \(error.message)")
            }
        }
        do {
            try report.svg.write(toFile: svgPath, atomically: true, encoding: .utf8)
            say("picture: \(svgPath)")
        } catch {
            report.notRun.append("the picture: cannot write \(svgPath): \(error)")
        }
        return report
    }

    /// Cores, CPU model, memory and kernel release, for the report's header.
    public static func machineDescription() -> String {
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("model name") }?.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "unknown CPU"
        return "\(ProcessInfo.processInfo.activeProcessorCount) cores (\(cpu)), \(ProcessInfo.processInfo.physicalMemory >> 30) GiB, Linux \(release)"
    }

    /// MemAvailable from /proc/meminfo, in bytes (0 when unreadable).
    public static func memAvailableBytes() -> Int {
        let text = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
        let kib = text.split(separator: "\n").first { $0.hasPrefix("MemAvailable:") }?
            .split(separator: " ").compactMap { Int($0) }.first ?? 0
        return kib * 1024
    }
}
