import Foundation
import GeminusTestSupport
import Testing

/// The secondary dies and a new one starts on the same address: the primary must say it lost
/// the secondary, run UNPROTECTED (and say so) once the hold time has passed, reconnect by
/// itself, send a full checkpoint and report PROTECTED again.
@Suite(.serialized) struct ReprotectionTests {
    @Test func primaryReconnectsToAReplacementSecondary() throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        let common = ["--vm", "billing-1", "--key", key, "--events", "--log-level", "warning"]
        func socket(_ name: String) -> [String] { ["--status-socket", s.path("\(name).sock")] }
        let first = try AgentProcess(name: "secondary-1", executable: GeminusBinary.url,
                                     arguments: ["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:0"] + common + socket("s1"),
                                     logFile: s.url.appendingPathComponent("s1.log"))
        defer { first.stop() }
        let port = try #require(first.wait(for: .listening, timeoutSeconds: 10)?["port"] as? Int)
        let primary = try AgentProcess(name: "primary", executable: GeminusBinary.url,
                                       arguments: ["agent", "--arbitration", "none", "--role", "primary", "--peer", "127.0.0.1:\(port)", "--ram-mib", "16"] + common + socket("p"),
                                       logFile: s.url.appendingPathComponent("p.log"))
        defer { primary.stop() }
        #expect(primary.wait(for: .protected, timeoutSeconds: 20) != nil)

        let mark = primary.eventCount
        first.kill(SIGKILL)
        first.process.waitUntilExit()
        #expect(primary.wait(for: .linkLost, timeoutSeconds: 5, from: mark) != nil)
        #expect(primary.wait(for: .unprotected, timeoutSeconds: 5, from: mark) != nil)

        let second = try AgentProcess(name: "secondary-2", executable: GeminusBinary.url,
                                      arguments: ["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:\(port)"] + common + socket("s2"),
                                      logFile: s.url.appendingPathComponent("s2.log"))
        defer { second.stop() }
        let reprotected = primary.wait(for: .protected, timeoutSeconds: 20, from: mark)
        #expect(reprotected != nil, "primary log: \((try? String(contentsOf: s.url.appendingPathComponent("p.log"), encoding: .utf8)) ?? "")")
        #expect(second.wait(for: .baseCommitted, timeoutSeconds: 5) != nil)
        // Epoch numbers keep growing across the reconnect: the new full checkpoint is newer.
        let before = try #require(primary.wait(for: .protected, timeoutSeconds: 1)?["epoch"] as? Int)
        let after = try #require(reprotected?["epoch"] as? Int)
        #expect(after > before)
    }
}
