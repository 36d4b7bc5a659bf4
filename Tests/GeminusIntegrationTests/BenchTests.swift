import Foundation
import Testing

/// `geminus bench` end to end, kept small: every part runs and reports (figures are the
/// benchmark's business, not a test's: docs/BENCHMARKS.md has a full run).
@Suite(.serialized, .disabled(if: TinyGuest.skipRequested, "GEMINUS_SKIP_VM_TESTS=1"))
struct BenchTests {
    @Test func benchMeasuresEveryMethodQEMUsMigrationAndTheScaling() throws {
        guard let kernel = try TinyGuest.kernel() else { return }
        let s = try Scratch()
        defer { s.remove() }
        let svg = s.path("bench.svg")
        let r = try GeminusBinary.run(["bench", "--kernel", kernel, "--ram-mib", "32", "--epochs", "15", "--pages", "16,128",
                                       "--migration-runs", "1", "--scaling-sizes", "64", "--scaling-pages", "10,100",
                                       "--no-pipeline", "--link-seconds", "1", "--svg", svg, "--json"], timeoutSeconds: 180)
        #expect(r.status == 0, "\(r.stderr)")
        let j = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], "\(r.stderr)")
        let runs = j["checkpoints"] as? [[String: Any]] ?? []
        #expect(Set(runs.compactMap { $0["method"] as? String }) == ["compare", "write-tracking"], "\(j["notRun"] ?? "")")
        #expect(runs.count == 4)
        for run in runs {
            #expect(run["epochs"] as? Int == 15)
            let pause = run["pauseMicros"] as? [String: Any] ?? [:]
            #expect((pause["p50"] as? Int ?? 0) > 0)
            #expect((run["pagesPerEpoch"] as? Double ?? 0) >= 1)
        }
        let migrations = j["qemuMigration"] as? [[String: Any]] ?? []
        #expect(migrations.count == 2)
        for m in migrations { #expect((m["downtimeMillis"] as? [Int] ?? []).count == 1, "\(m)") }
        #expect((j["scaling"] as? [[String: Any]] ?? []).count == 4)
        let link = j["link"] as? [String: Any] ?? [:]
        #expect((link["geminusBytesPerSecond"] as? Double ?? 0) > 0)
        #expect((link["iperf3BytesPerSecond"] as? Double ?? 0) > 0, "\(link)")
        // COLO is named as not run, with the reason.
        #expect((j["notRun"] as? [String] ?? []).contains { $0.hasPrefix("QEMU COLO") })
        let picture = try String(contentsOfFile: svg, encoding: .utf8)
        #expect(picture.hasPrefix("<svg") && picture.contains("polyline"))
    }
}
