import Foundation
import GeminusTestSupport
import Testing

/// A secondary listening on a free loopback port and a primary connected to it, each with its
/// own control socket (`s.sock`, `p.sock`) and log in `scratch`. Both are stopped by the caller.
func startAgentPair(_ scratch: Scratch, common: [String], secondaryExtra: [String] = [], primaryExtra: [String] = [])
    throws -> (secondary: AgentProcess, primary: AgentProcess) {
    let secondary = try AgentProcess(name: "secondary", executable: GeminusBinary.url,
                                     arguments: ["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:0",
                                                 "--status-socket", scratch.path("s.sock")] + common + secondaryExtra,
                                     logFile: scratch.url.appendingPathComponent("s.log"))
    guard let port = secondary.wait(for: .listening, timeoutSeconds: 10)?["port"] as? Int else {
        secondary.stop()
        throw GeminusTestError("the secondary never listened: \((try? String(contentsOf: scratch.url.appendingPathComponent("s.log"), encoding: .utf8)) ?? "")")
    }
    let primary = try AgentProcess(name: "primary", executable: GeminusBinary.url,
                                   arguments: ["agent", "--arbitration", "none", "--role", "primary", "--peer", "127.0.0.1:\(port)",
                                               "--status-socket", scratch.path("p.sock")] + common + primaryExtra,
                                   logFile: scratch.url.appendingPathComponent("p.log"))
    return (secondary, primary)
}

struct GeminusTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// `geminus status` as an operator uses it: what each agent says about the VM, and an exit
/// status a monitoring script can act on.
@Suite(.serialized) struct StatusTests {
    @Test func statusShowsProtectionAndSaysLoudlyWhenItIsLost() throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        let common = ["--vm", "ledger", "--key", key, "--events", "--log-level", "warning"]
        let (secondary, primary) = try startAgentPair(s, common: common, primaryExtra: ["--ram-mib", "8"])
        defer { secondary.stop(); primary.stop() }
        #expect(primary.wait(for: .protected, timeoutSeconds: 20) != nil)
        // Status refreshes with each progress report (every 500 ms).
        _ = primary.wait(for: .progress, timeoutSeconds: 2, from: primary.eventCount)

        let p = try GeminusBinary.run(["status", "--socket", s.path("p.sock"), "--json"])
        let pj = try #require(try JSONSerialization.jsonObject(with: Data(p.stdout.utf8)) as? [[String: Any]])
        #expect(pj.first?["role"] as? String == "primary")
        #expect(pj.first?["state"] as? String == "protected")
        #expect(pj.first?["vm"] as? String == "ledger")
        #expect((pj.first?["acknowledged"] as? Int ?? 0) > 0)
        #expect(p.status == 0)
        let sText = try GeminusBinary.run(["status", "--socket", s.path("s.sock")])
        #expect(sText.stdout.contains("ledger  secondary  following"), "\(sText.stdout)")
        #expect(sText.status == 0)

        let mark = primary.eventCount
        secondary.kill(SIGKILL)
        #expect(primary.wait(for: .unprotected, timeoutSeconds: 5, from: mark) != nil)
        _ = primary.wait(for: .progress, timeoutSeconds: 2, from: primary.eventCount)
        let lost = try GeminusBinary.run(["status", "--socket", s.path("p.sock")])
        #expect(lost.stdout.contains("UNPROTECTED"), "\(lost.stdout)")
        #expect(lost.status == 2)
        // The dead secondary's socket no longer answers: said so, not skipped.
        let dead = try GeminusBinary.run(["status", "--socket", s.path("s.sock")])
        #expect(dead.stdout.contains("does not answer"))
        #expect(dead.status == 2)
    }

    /// A libvirt pair: status names the domain and the dirty-page method, the secondary
    /// reports its standby ready; when the standby domain is destroyed behind the agent's back,
    /// status says DOWN and exits 2 (a secondary that cannot resume is no protection).
    @Test(.disabled(if: TinyGuest.skipRequested, "GEMINUS_SKIP_VM_TESTS=1"))
    func libvirtStatusShowsTheDomainAndTheStandbysHealth() throws {
        guard let kernel = try TinyGuest.kernel() else { return }
        let s = try Scratch()
        defer { s.remove() }
        let d = try TestGuestDomains(uri: "qemu:///system", prefix: "geminus-test-st", directory: s.url, kernel: kernel,
                                     append: "pages=8", ramMiB: 16)
        defer { d.remove() }
        try d.startPrimary()
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        let common = ["--vm", "ledger", "--key", key, "--events", "--log-level", "warning", "--guest", "libvirt"]
        let (secondary, primary) = try startAgentPair(s, common: common, secondaryExtra: ["--domain", d.standby],
                                                      primaryExtra: ["--domain", d.primary])
        defer { secondary.stop(); primary.stop() }
        try #require(primary.wait(for: .protected, timeoutSeconds: 60) != nil)
        _ = primary.wait(for: .progress, timeoutSeconds: 2, from: primary.eventCount)
        Thread.sleep(forTimeInterval: 1.2)  // one standby health round

        let p = try GeminusBinary.run(["status", "--socket", s.path("p.sock")])
        #expect(p.stdout.contains("PROTECTED") && p.stdout.contains("(libvirt domain \(d.primary), dirty pages by write-tracking)"), "\(p.stdout)")
        #expect(p.status == 0)
        let sj = try #require(try JSONSerialization.jsonObject(with: Data(GeminusBinary.run(["status", "--socket", s.path("s.sock"), "--json"]).stdout.utf8)) as? [[String: Any]])
        #expect(sj.first?["standby"] as? String == "ready", "\(sj)")
        #expect(sj.first?["domain"] as? String == d.standby)

        // The standby QEMU is killed behind the agent's back.
        try d.connection.destroy(try d.connection.lookupDomain(named: d.standby))
        Thread.sleep(forTimeInterval: 2.2)
        let down = try GeminusBinary.run(["status", "--socket", s.path("s.sock")])
        #expect(down.stdout.contains("standby DOWN"), "\(down.stdout)")
        #expect(down.status == 2)
    }

    /// The first checkpoint copies all of guest RAM; for a large guest that takes seconds, and
    /// the operator sees it move: percent, pages, time left, in the log and as events.
    @Test func fullCopyShowsProgress() throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        let common = ["--vm", "ledger", "--key", key, "--events", "--log-level", "notice"]
        // 512 MiB: several seconds in a debug build, so more than one report.
        let (secondary, primary) = try startAgentPair(s, common: common, primaryExtra: ["--ram-mib", "512"])
        defer { secondary.stop(); primary.stop() }
        let first = try #require(primary.wait(for: .fullSyncProgress, timeoutSeconds: 30))
        #expect(first["pagesTotal"] as? Int == 512 * 256)
        try #require(primary.wait(for: .protected, timeoutSeconds: 120) != nil)
        let log = try String(contentsOf: s.url.appendingPathComponent("p.log"), encoding: .utf8)
        #expect(log.contains("full checkpoint 1: sending 512 MiB of guest RAM"), "\(log.prefix(2000))")
        let line = try #require(log.split(separator: "\n").first { $0.contains("MiB (") && $0.contains("left") })
        #expect(line.contains("of 512 MiB"), "\(line)")
    }

    @Test func noAgentIsAnErrorThatSaysWhereItLooked() throws {
        let r = try GeminusBinary.run(["status", "no-such-vm-\(UInt32.random(in: 0...UInt32.max))"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("/run/geminus"))
    }
}
