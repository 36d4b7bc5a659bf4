import Foundation
import Testing

/// Review finding L2: numbers and names from the command line are checked before anything
/// starts. Each case used to trap the agent (a negative millisecond value converted to UInt64,
/// a zero output buffer, zero RAM) or pass a name with `/` or `,` into paths and QEMU options.
@Suite struct CLIInputTests {
    static func agent(_ s: Scratch, _ extra: [String]) -> [String] {
        ["agent", "--arbitration", "none", "--role", "primary", "--peer", "127.0.0.1:1", "--key", s.path("pair.key"),
         "--duration-seconds", "2", "--status-socket", s.path("a.sock")] + extra
    }

    @Test(arguments: [
        (["--peer-silence-millis=-1"], "--peer-silence-millis -1"),
        (["--unprotect-after-millis=-1"], "--unprotect-after-millis -1"),
        (["--unprotect-after-millis=0"], "--unprotect-after-millis 0"),
        (["--takeover-after-millis=99999999999"], "--takeover-after-millis 99999999999"),
        (["--output-limit-bytes", "0"], "--output-limit-bytes 0"),
        (["--ram-mib", "0", "--guest", "qemu", "--kernel", "/nonexistent"], "--ram-mib 0"),
        (["--vm", "a/b"], "--vm 'a/b'"),
        (["--vm", "x,share=on"], "--vm 'x,share=on'"),
        (["--vm=-x"], "--vm '-x'"),
        (["--vm", ".."], "--vm '..'"),
        (["--guest", "libvirt", "--domain", "d,if=none"], "--domain 'd,if=none'"),
    ])
    func agentRefusesBeforeStarting(extra: [String], named: String) throws {
        let s = try Scratch()
        defer { s.remove() }
        #expect(try GeminusBinary.run(["keygen", "--out", s.path("pair.key")]).status == 0)
        let r = try GeminusBinary.run(Self.agent(s, extra), timeoutSeconds: 20)
        #expect(r.status != 0)
        #expect(r.stderr.contains(named), "\(r.stderrTail)")
        #expect(!r.stderr.contains("Fatal error"), "\(r.stderrTail)")
        #expect(!FileManager.default.fileExists(atPath: s.path("a.sock")), "the agent started before refusing")
    }

    @Test func everyCommandTakingANameSaysTheRule() throws {
        for args in [["failover", "a/b"], ["status", "../x"], ["enroll", "a,b", "--peer", "h"], ["unenroll", "a/b"],
                     ["ha", "add", "a/b"], ["ha", "remove", ".x"]] {
            let r = try GeminusBinary.run(args, timeoutSeconds: 20)
            #expect(r.status != 0, "\(args)")
            #expect(r.stderr.contains("A-Z a-z 0-9 . _ -"), "\(args): \(r.stderrTail)")
        }
    }
}
