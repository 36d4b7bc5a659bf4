import Foundation
import Testing
@testable import GeminusHA

/// The HA path's stories: each file in `scenarios/` is a list of commands, a line `== log ==`,
/// and the log the simulated cluster must produce. GEMINUS_UPDATE_SCENARIOS=1 rewrites the
/// expected logs from what happens (then read the diff: it is the behaviour change).
struct ScenarioTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("scenarios")
    static let names: [String] = ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? [])
        .filter { $0.hasSuffix(".txt") }.sorted()

    @Test func scenariosExist() {
        #expect(Self.names.count >= 7, "scenarios in \(Self.directory.path)")
    }

    @Test(arguments: names)
    func scenario(_ name: String) throws {
        let url = Self.directory.appendingPathComponent(name)
        let text = try String(contentsOf: url, encoding: .utf8)
        let parts = text.components(separatedBy: "\n== log ==\n")
        let commands = parts[0].split(separator: "\n").map(String.init)
        let expected = parts.count > 1 ? parts[1].split(separator: "\n", omittingEmptySubsequences: false).map(String.init).filter { !$0.isEmpty } : []

        let world = HAWorld()
        for line in commands where !line.hasPrefix("#") && !line.trimmingCharacters(in: .whitespaces).isEmpty {
            try world.run(line.trimmingCharacters(in: .whitespaces))
        }
        #expect(world.violations.isEmpty, "\(world.violations)")
        if ProcessInfo.processInfo.environment["GEMINUS_UPDATE_SCENARIOS"] == "1" {
            try (parts[0] + "\n== log ==\n" + world.log.joined(separator: "\n") + "\n").write(to: url, atomically: true, encoding: .utf8)
            return
        }
        if world.log != expected {
            var diff: [String] = []
            for i in 0..<max(world.log.count, expected.count) {
                let a = i < world.log.count ? world.log[i] : "<none>"
                let e = i < expected.count ? expected[i] : "<none>"
                if a != e { diff.append("line \(i + 1):\n  expected: \(e)\n  actual:   \(a)") }
                if diff.count >= 5 { break }
            }
            Issue.record("scenario \(name) went differently:\n\(diff.joined(separator: "\n"))\n--- whole log ---\n\(world.log.joined(separator: "\n"))")
        }
    }
}
