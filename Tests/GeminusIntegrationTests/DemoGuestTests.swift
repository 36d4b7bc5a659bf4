import Foundation
import GeminusDemo
import Testing

/// `geminus demo`'s choice of guest (the Linux one by default, the tiny one with --tiny or any
/// option only its demo has) and the Linux demo's reading of the kill test's report: a lost
/// acknowledgement, a transaction applied twice or a disk unlike RAM must fail the demo.
struct DemoGuestTests {
    @Test func linuxIsTheDefault() throws {
        #expect(try DemoGuest.choose(linux: false, tiny: false, tinyOptions: []) == .linux)
        #expect(try DemoGuest.choose(linux: true, tiny: false, tinyOptions: []) == .linux)
    }

    @Test func tinyOnRequestOrByItsOptions() throws {
        #expect(try DemoGuest.choose(linux: false, tiny: true, tinyOptions: []) == .tiny)
        #expect(try DemoGuest.choose(linux: false, tiny: false, tinyOptions: ["--simulated"]) == .tiny)
        #expect(try DemoGuest.choose(linux: false, tiny: true, tinyOptions: ["--qemu", "--kernel"]) == .tiny)
    }

    @Test func contradictionsAreRefused() {
        #expect(throws: DemoFailure.self) { try DemoGuest.choose(linux: true, tiny: true, tinyOptions: []) }
        #expect(throws: DemoFailure.self) { try DemoGuest.choose(linux: true, tiny: false, tinyOptions: ["--qemu"]) }
    }

    @Test func theCommandLineSaysWhichOptionClashes() throws {
        let r = try GeminusBinary.run(["demo", "--linux", "--simulated"], timeoutSeconds: 30)
        #expect(r.status != 0)
        #expect(r.stderr.contains("--simulated is an option of the tiny-guest demo"), "\(r.stderr)")
    }

    /// A report as `kill-test --kills 1 --narrate` writes it (fields the demo reads).
    static func report(lost: Int = 0, duplicated: Int = 0, disk: String = "rw", mismatchesAfter: Int = 0, ok: Bool = true) -> [String: Any] {
        ["ok": ok, "seconds": 52.3, "dir": "/tmp/x", "disk": disk, "kernel_version": "6.1.0-56-cloud-amd64",
         "boot_to_service_seconds": 7.1, "first_protected_seconds": 1.9,
         "kills": [["kill": 1, "takeover_ms": 188, "took_over_event": ["fromEpoch": 140], "same_boot": true,
                    "check_after": ["result": mismatchesAfter == 0 ? "ok" : "mismatch", "mismatches": mismatchesAfter, "disk": disk],
                    "reprotected_seconds": 3.1, "client_gap_ms": ["last_reply_before_kill": 2, "first_reply_after_kill": 260]]],
         "client": ["acknowledged": 2000, "per_second": 300.5, "latency_ms": ["p50": 0.8, "p99": 50.1, "max": 300.0],
                    "reconnects": 0, "lost": lost, "changed": 0, "duplicated": duplicated, "chain_errors": 0, "ok": lost + duplicated == 0],
         "guest_check": ["result": "ok", "mismatches": 0]]
    }

    func check(_ s: DemoSummary, _ name: String) -> Bool? { s.checks.first { $0.name == name }?.passed }

    @Test func aCleanRunPasses() {
        let s = LinuxDemoReport(Self.report()).summary
        #expect(s.passed, "\(s.reportLines)")
        #expect(s.verdict == "acknowledged transactions 2000, lost 0, applied twice 0, disk consistent with RAM")
        #expect(s.figures["takeoverMillis"] as? Int == 188)
        #expect(s.json["passed"] as? Bool == true)
    }

    @Test func aLostAcknowledgementFails() {
        let s = LinuxDemoReport(Self.report(lost: 3, ok: false)).summary
        #expect(!s.passed)
        #expect(check(s, "no acknowledged transaction lost") == false)
        #expect(s.verdict?.contains("lost 3") == true)
    }

    @Test func twiceOrADiskUnlikeRAMFails() {
        #expect(check(LinuxDemoReport(Self.report(duplicated: 1, ok: false)).summary, "none applied twice") == false)
        #expect(check(LinuxDemoReport(Self.report(mismatchesAfter: 2, ok: false)).summary, "disk consistent with RAM") == false)
        #expect(check(LinuxDemoReport(Self.report(disk: "ro")).summary, "disk consistent with RAM") == false)
    }

    @Test func theKillTestsOwnVerdictCounts() {
        let s = LinuxDemoReport(Self.report(ok: false)).summary
        #expect(!s.passed)
        #expect(check(s, "kill test verdict") == false)
    }
}
