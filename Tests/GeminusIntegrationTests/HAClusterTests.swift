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
        let script = TinyGuest.repoRoot.appendingPathComponent("Tools/ha-cluster-test")
        let p = Process()
        p.executableURL = script
        p.arguments = [GeminusBinary.url.path]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let started = Date()
        try p.run()
        let errBox = DataBox()
        let reader = Thread { errBox.data = err.fileHandleForReading.readDataToEndOfFile() }
        reader.start()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        while !reader.isFinished { Thread.sleep(forTimeInterval: 0.01) }
        let elapsedSeconds = Date().timeIntervalSince(started)
        let stderr = String(decoding: errBox.data, as: UTF8.self).split(separator: "\n").filter { !$0.contains("Killed") }.suffix(20).joined(separator: "\n")
        let summary = try #require(try? JSONSerialization.jsonObject(with: stdout) as? [String: Any],
                                   "ha-cluster-test printed no verdict (status \(p.terminationStatus)):\n\(stderr)")
        for c in summary["checks"] as? [[String: Any]] ?? [] {
            #expect(c["passed"] as? Bool == true, "\(c["name"] ?? "?"): \(c["detail"] ?? "")")
        }
        #expect(summary["passed"] as? Bool == true, "\(summary)")
        #expect(p.terminationStatus == 0, "\(stderr)")
        let times = summary["times"] as? [String: Any] ?? [:]
        // The goal of issue 9: node death to VM running elsewhere under 10 s with tuned tokens.
        #expect((times["totalMillis"] as? Int ?? .max) < 10_000, "\(times)")
        #expect(elapsedSeconds < 90, "the whole test took \(Int(elapsedSeconds)) s")
        print("ha-cluster-test: \(times) in \(Int(elapsedSeconds)) s")
    }
}
