import Foundation
import Testing

/// The HA path on a real Corosync cluster: Tools/ha-cluster-test runs three Corosync nodes in
/// network namespaces, a `geminus ha agent` in each and the tiny guest under libvirt, kills
/// one node, and prints its verdicts as JSON. Needs root, corosync and libvirtd; a machine
/// without them fails with the fix (GEMINUS_SKIP_VM_TESTS=1 disables it).
@Suite(.serialized, .disabled(if: TinyGuest.skipRequested, "GEMINUS_SKIP_VM_TESTS=1"))
struct HAClusterTests {
    @Test func nodeDeathRestartsItsVMsOnceAfterTheFence() throws {
        guard getuid() == 0 else {
            Issue.record("the HA cluster test needs root (network and mount namespaces): run it as root, or set GEMINUS_SKIP_VM_TESTS=1")
            return
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/corosync") else {
            Issue.record("corosync is not installed: run Tools/install-deps as root (apt-get install corosync), or set GEMINUS_SKIP_VM_TESTS=1")
            return
        }
        let r = try GeminusBinary.run(executable: TinyGuest.repoRoot.appendingPathComponent("Tools/ha-cluster-test"), [GeminusBinary.url.path],
                                      timeoutSeconds: 300)
        let summary = try #require(try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
                                   "ha-cluster-test printed no verdict (status \(r.status)):\n\(r.stderrTail)")
        for c in summary["checks"] as? [[String: Any]] ?? [] {
            #expect(c["passed"] as? Bool == true, "\(c["name"] ?? "?"): \(c["detail"] ?? "")")
        }
        #expect(summary["passed"] as? Bool == true, "\(summary)")
        #expect(r.status == 0, "\(r.stderrTail)")
        let times = summary["times"] as? [String: Any] ?? [:]
        // The goal of issue 9: node death to VM running elsewhere under 10 s with tuned tokens.
        #expect((times["totalMillis"] as? Int ?? .max) < 10_000, "\(times)")
        #expect(r.elapsedSeconds < 90, "the whole test took \(Int(r.elapsedSeconds)) s")
        print("ha-cluster-test: \(times) in \(Int(r.elapsedSeconds)) s")
    }
}
