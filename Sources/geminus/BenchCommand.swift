import ArgumentParser
import Foundation
import GeminusBench
import GeminusQEMU

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
        let suite = BenchSuite(kernelPath: guestKernel, ramMiB: ramMib, intervalMillis: intervalMillis, epochs: epochs,
                               windows: try numbers(pages, "pages"), guestOptions: guestOptions,
                               methods: methods.split(separator: ",").compactMap { GuestCheckpointBench.Method(rawValue: String($0)) },
                               migrationRuns: migrationRuns, colo: colo, scalingSizes: try numbers(scalingSizes, "scaling-sizes"),
                               scalingPages: try numbers(scalingPages, "scaling-pages"), pipeline: pipeline, linkSeconds: linkSeconds,
                               svgPath: svg, command: "geminus " + CommandLine.arguments.dropFirst().joined(separator: " "))
        let report = suite.run(say: say)
        if json {
            let data = try JSONSerialization.data(withJSONObject: report.json, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(report.table)
        }
        if report.guest.isEmpty { throw ExitCode(1) }
    }
}
