import Foundation
import Testing
import GeminusSimulation

/// Every story under scenarios/ runs and its event log is compared line by line with the one
/// checked in. After a reviewed change of behaviour, rewrite the logs with
/// `GEMINUS_SCENARIO_REWRITE=1 swift test --filter ScenarioTests` and read the diff.
@Suite struct ScenarioTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("scenarios")

    static var files: [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []).filter { $0.hasSuffix(".txt") }.sorted()
    }

    @Test func thereAreScenariosForEveryFaultTheBriefNames() {
        #expect(Self.files.count >= 8, "only \(Self.files.count) scenario files in \(Self.directory.path)")
    }

    @Test(arguments: ScenarioTests.files)
    func scenario(_ file: String) throws {
        let url = Self.directory.appendingPathComponent(file)
        let text = try String(contentsOf: url, encoding: .utf8)
        let scenario = Scenario(name: file, text: text)
        let outcome = try scenario.run()
        if ProcessInfo.processInfo.environment["GEMINUS_SCENARIO_REWRITE"] == "1" {
            try Scenario.rewrite(text, log: outcome.log).write(to: url, atomically: true, encoding: .utf8)
        }
        #expect(outcome.failures.isEmpty, "\(file): \(outcome.failures.joined(separator: "; "))")
        if outcome.log != scenario.expectedLog {
            Issue.record("""
                \(file): the event log differs from the expected one.
                --- expected
                \(scenario.expectedLog.joined(separator: "\n"))
                --- actual
                \(outcome.log.joined(separator: "\n"))
                --- first difference at line \(firstDifference(scenario.expectedLog, outcome.log) + 1)
                """)
        }
    }

    func firstDifference(_ a: [String], _ b: [String]) -> Int {
        for i in 0..<min(a.count, b.count) where a[i] != b[i] { return i }
        return min(a.count, b.count)
    }
}
