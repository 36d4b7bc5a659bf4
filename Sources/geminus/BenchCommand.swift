import ArgumentParser
import Foundation
import GeminusBench
import GeminusCore
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure checkpoint latency on a real guest, side by side with QEMU's own live migration.",
        discussion: """
        On the tiny test guest under QEMU (TCG), for each dirty window and each dirty-page method \
        (compare, write-tracking): the pause per checkpoint and its parts (stop, dirty pages, device \
        state, cont), encode time, bytes and compression, commit latency (pause start to the \
        acknowledgement of a secondary thread over authenticated loopback TCP), epochs per second, this \
        process's CPU and the guest's speed. Beside it, QEMU's live migration of the same guest to a \
        local QEMU over a unix socket, with the downtime QEMU reports, and the ratios. Then the \
        dirty-page part against guest RAM (128 MiB to 4 GiB, memory of that size in this process: \
        TCG cannot run such guests usefully) for both methods. Prints a table (or --json) and writes \
        an SVG picture. QEMU COLO is tried on the same guest; where it cannot run, the table says what \
        it saw. Run as root.
        """)

    @Option(help: "The multiboot test guest (default: built from Tools/guest-tiny beside the binary).") var kernel: String?
    @Option(help: "Guest RAM in MiB.") var ramMib = 64
    @Option(help: "Checkpoint interval in milliseconds.") var intervalMillis = 25
    @Option(help: "Checkpoints measured per run (after the untimed full one).") var epochs = 200
    @Option(help: "Dirty windows: pages the guest rewrites in its loop, comma-separated (about that many pages per epoch).") var pages = "16,256,2048"
    @Option(help: "More options for the test guest, e.g. 'walk=0' (no locality: each loop writes the next pages) or 'walk=64' (the window moves faster); see Tools/guest-tiny/README.md.") var guestOptions = ""
    @Option(help: "Dirty-page methods, comma-separated: compare, write-tracking.") var methods = "compare,write-tracking"
    @Option(help: "QEMU live migrations per dirty window (0: none).") var migrationRuns = 3
    @Flag(inversion: .prefixedNo, help: "Try QEMU COLO (x-colo, 100 ms checkpoints) on the same guest; about 8 s per dirty window.") var colo = true
    @Option(help: "Guest RAM sizes in MiB for the scaling curves, comma-separated (sizes that do not fit in free memory are skipped and said so; empty: none).") var scalingSizes = "128,256,1024,4096"
    @Option(help: "Pages written per epoch for the scaling curves, comma-separated.") var scalingPages = "100,1000,10000"
    @Flag(inversion: .prefixedNo, help: "Measure the pipeline (capture, encode, decode) on the simulated guest against memcpy.") var pipeline = true
    @Option(help: "Seconds of the pair-link throughput run against iperf3 on loopback (0: none).") var linkSeconds = 3.0
    @Option(help: "Write the picture here.") var svg = "geminus-bench.svg"
    @Flag(help: "Print JSON instead of the table (progress stays on standard error).") var json = false

    func numbers(_ list: String, _ name: String) throws -> [Int] {
        let parts = list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        return try parts.map { p in
            guard let v = Int(p), v > 0 else { throw ValidationError("--\(name): '\(p)' is not a positive number") }
            return v
        }
    }

    func validate() throws {
        guard (1...10_000).contains(epochs) else { throw ValidationError("--epochs must be 1...10000") }
        guard (1...1000).contains(intervalMillis) else { throw ValidationError("--interval-millis must be 1...1000") }
        guard (16...4096).contains(ramMib) else { throw ValidationError("--ram-mib must be 16...4096") }
        guard (0...20).contains(migrationRuns) else { throw ValidationError("--migration-runs must be 0...20") }
        guard !guestOptions.contains("pages="), guestOptions.allSatisfy({ $0.isLetter || $0.isNumber || " =_x".contains($0) }) else {
            throw ValidationError("--guest-options: key=value words of the test guest (not pages=, which --pages sets)")
        }
        guard (0...60).contains(linkSeconds) else { throw ValidationError("--link-seconds must be 0...60") }
        let windows = try numbers(pages, "pages")
        guard !windows.isEmpty, windows.allSatisfy({ $0 * 4096 < ramMib << 19 }) else {
            throw ValidationError("--pages: each dirty window must be under half the guest's pages (\(ramMib * 128))")
        }
        for m in methods.split(separator: ",") where GuestCheckpointBench.Method(rawValue: String(m)) == nil {
            throw ValidationError("--methods: unknown method '\(m)' (compare, write-tracking)")
        }
        _ = try numbers(scalingSizes, "scaling-sizes")
        _ = try numbers(scalingPages, "scaling-pages")
    }

    func run() throws {
        let say: (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
        let guestKernel: String
        if let kernel {
            guestKernel = kernel
        } else {
            switch TestGuestLocator.tinyGuest(say: say) {
            case .success(let p): guestKernel = p
            case .failure(let e): throw e
            }
        }
        guard QEMULauncher.locate("qemu-system-x86_64") != nil else {
            throw OperatorError(description: "qemu-system-x86_64 is not installed\n  fix: \(QEMULauncher.installHint)")
        }
        let windows = try numbers(pages, "pages")
        var chosen = methods.split(separator: ",").compactMap { GuestCheckpointBench.Method(rawValue: String($0)) }
        var report = BenchReport(machine: Self.machineDescription(), command: "geminus " + CommandLine.arguments.dropFirst().joined(separator: " "),
                                 ramMiB: ramMib, intervalMillis: intervalMillis)
        if chosen.contains(.writeTracking) {
            var why: GeminusError? = WriteTrackingFinder.probe()
            if why == nil { do { _ = try WriteTrackingPreload.require() } catch { why = error } }
            if let why {
                report.notRun.append("write-tracking: \(why.message)\(why.fix.map { " (fix: \($0))" } ?? "")")
                chosen.removeAll { $0 == .writeTracking }
            }
        }
        var sizes = try numbers(scalingSizes, "scaling-sizes")
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

        let guestBench = GuestCheckpointBench(kernelPath: guestKernel, ramMiB: ramMib, intervalMillis: intervalMillis, epochs: epochs,
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
                let r = MigrationDowntimeBench(kernelPath: guestKernel, ramMiB: ramMib, runs: migrationRuns, guestOptions: guestOptions).run(pagesPerLoop: w)
                for f in r.failures { report.notRun.append("a QEMU migration at \(w) pages/loop: \(f)") }
                report.migration.append(r)
            }
            if colo {
                // Once COLO has failed one way, the other windows would only repeat it.
                if let earlier = report.colo.first, case .failed(let why) = earlier.outcome {
                    report.colo.append((w, .failed(why)))
                } else {
                    say("\(elapsed())  QEMU COLO: \(w) pages/loop")
                    let outcome = ColoAttempt(kernelPath: guestKernel, ramMiB: ramMib, guestOptions: guestOptions).run(pagesPerLoop: w)
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
        let scaling = CaptureScalingBench(sizesMiB: sizes, pagesWritten: try numbers(scalingPages, "scaling-pages"), repetitions: 7)
        for s in sizes {
            do {
                report.scaling += try scaling.run(ramMiB: s) { say("\(elapsed())  \($0)") }
            } catch {
                report.notRun.append("scaling at \(s) MiB: \(error.message)")
            }
        }
        do {
            try report.svg.write(toFile: svg, atomically: true, encoding: .utf8)
            say("picture: \(svg)")
        } catch {
            report.notRun.append("the picture: cannot write \(svg): \(error)")
        }
        if json {
            let data = try JSONSerialization.data(withJSONObject: report.json, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(report.table)
        }
        if report.guest.isEmpty { throw ExitCode(1) }
    }

    static func machineDescription() -> String {
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("model name") }?.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "unknown CPU"
        return "\(ProcessInfo.processInfo.activeProcessorCount) cores (\(cpu)), \(ProcessInfo.processInfo.physicalMemory >> 30) GiB, Linux \(release)"
    }

    static func memAvailableBytes() -> Int {
        let text = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
        let kib = text.split(separator: "\n").first { $0.hasPrefix("MemAvailable:") }?
            .split(separator: " ").compactMap { Int($0) }.first ?? 0
        return kib * 1024
    }
}
