import Foundation
import GeminusTestSupport
import Testing

/// Bad input from an operator gets a message that names the cause and the fix, and exit 1.
@Suite struct OperatorErrorTests {
    @Test func unknownFlagIsNamed() throws {
        let r = try GeminusBinary.run(["agent", "--arbitration", "none", "--role", "primary", "--key", "/x", "--bogus"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("--bogus"))
    }

    @Test func missingKeyFileSaysHowToCreateOne() throws {
        let s = try Scratch()
        defer { s.remove() }
        let r = try GeminusBinary.run(["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:0", "--key", s.path("nope.key"), "--duration-seconds", "1", "--status-socket", s.path("a.sock")])
        #expect(r.status != 0)
        #expect(r.stderr.contains(s.path("nope.key")))
        #expect(r.stderr.contains("geminus keygen"))
    }

    @Test func worldReadableKeyIsRefusedWithTheChmod() throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        chmod(key, 0o644)
        let r = try GeminusBinary.run(["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:0", "--key", key, "--duration-seconds", "1", "--status-socket", s.path("a.sock")])
        #expect(r.status != 0)
        #expect(r.stderr.contains("chmod 600"))
    }

    @Test func keygenRefusesToOverwrite() throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        let again = try GeminusBinary.run(["keygen", "--out", key])
        #expect(again.status != 0)
        #expect(again.stderr.contains(key))
    }

    @Test func portInUseIsNamed() throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        _ = try GeminusBinary.run(["keygen", "--out", key])
        // Hold a port, then ask the agent for it.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && listen(fd, 1) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        let port = UInt16(bigEndian: addr.sin_port)
        let r = try GeminusBinary.run(["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:\(port)", "--key", key, "--duration-seconds", "1", "--status-socket", s.path("a.sock")])
        #expect(r.status != 0)
        #expect(r.stderr.contains("in use"))
        #expect(r.stderr.contains("\(port)"))
    }

    @Test func secondaryWithoutListenAddressIsToldWhatToAdd() throws {
        let r = try GeminusBinary.run(["agent", "--arbitration", "none", "--role", "secondary", "--key", "/x"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("--listen"))
    }

    /// A primary holding another key is refused by the secondary, which logs why; no
    /// checkpoint from it is accepted.
    @Test func primaryWithTheWrongKeyIsRefused() throws {
        let s = try Scratch()
        defer { s.remove() }
        _ = try GeminusBinary.run(["keygen", "--out", s.path("a.key")])
        _ = try GeminusBinary.run(["keygen", "--out", s.path("b.key")])
        let sec = try AgentProcess(name: "secondary", executable: GeminusBinary.url,
                                   arguments: ["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:0", "--key", s.path("a.key"),
                                               "--events", "--duration-seconds", "4", "--status-socket", s.path("s.sock")],
                                   logFile: s.url.appendingPathComponent("s.log"))
        defer { sec.stop() }
        let port = try #require(sec.wait(for: .listening, timeoutSeconds: 10)?["port"] as? Int)
        let pri = try GeminusBinary.run(["agent", "--arbitration", "none", "--role", "primary", "--peer", "127.0.0.1:\(port)", "--key", s.path("b.key"),
                                         "--ram-mib", "8", "--duration-seconds", "1.5", "--log-level", "warning", "--status-socket", s.path("p.sock")])
        sec.kill(SIGTERM)
        sec.process.waitUntilExit()
        let secLog = (try? String(contentsOf: s.url.appendingPathComponent("s.log"), encoding: .utf8)) ?? ""
        #expect(secLog.lowercased().contains("authentication failed"), "secondary log:\n\(secLog)")
        #expect(pri.stderr.lowercased().contains("authentication"), "primary log:\n\(pri.stderr)")
        #expect(sec.last(.baseCommitted) == nil)
    }
}
