import Foundation
import Testing

/// Two real agent processes on loopback; the primary is SIGKILLed at a random moment inside an
/// epoch; the demo's checks (resumed counter vs last acknowledged checkpoint, S2 on every
/// packet the observer saw, output continuity, failover bound) must all pass.
@Suite(.serialized) struct FailoverTests {
    @Test(arguments: [11, 12, 13, 14] as [UInt64])
    func primaryKilledMidEpochSecondaryContinues(seed: UInt64) throws {
        let r = try GeminusBinary.run(["demo", "--simulated", "--json", "--duration-seconds", "2", "--seed", "\(seed)"], timeoutSeconds: 90)
        let summary = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
                                   "demo printed no JSON; stderr:\n\(r.stderr)")
        let checks = summary["checks"] as? [[String: Any]] ?? []
        for c in checks {
            #expect(c["passed"] as? Bool == true, "\(c["name"] ?? "?"): \(c["detail"] ?? "")")
        }
        #expect(checks.count == 5)
        #expect(summary["passed"] as? Bool == true)
        #expect(r.status == 0)
    }
}
