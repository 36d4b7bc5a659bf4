import Foundation
import GeminusTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `geminus failover`: two agent processes, each started with both --listen and --peer. The VM
/// moves to the secondary and back; each time the new primary's guest resumes from exactly the
/// counter the old primary captured at its final checkpoint (nothing lost), the generation
/// grows, the old primary follows as the secondary and the pair is protected again.
@Suite(.serialized) struct PlannedSwitchoverTests {
    /// A port nothing listens on right now (the agents need each other's fixed addresses).
    static func freePort() throws -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard ok else { throw POSIXError(.EADDRINUSE) }
        return UInt16(bigEndian: addr.sin_port)
    }

    /// Alive and not a zombie (processes killed here are not always reaped).
    static func isRunning(pid: Int) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        let state = stat[stat.index(close, offsetBy: 2)]
        return state != "Z" && state != "X"
    }

    static let guests: [String] = TinyGuest.skipRequested ? ["simulated"] : ["simulated", "qemu", "libvirt"]

    @Test(arguments: guests)
    func switchoverBothWaysLosesNothing(guest: String) throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        var common = ["--vm", "ledger", "--key", key, "--events", "--log-level", "warning", "--ram-mib", "16", "--guest", guest]
        // Per agent: libvirt agents name their own host's domain of the VM.
        var (extraA, extraB) = ([String](), [String]())
        var domains: TestGuestDomains?
        defer { domains?.remove() }
        if guest != "simulated" {
            guard let kernel = try TinyGuest.kernel() else { return }
            if guest == "qemu" {
                common += ["--kernel", kernel, "--append", "pages=16"]
            } else {
                let d = try TestGuestDomains(uri: "qemu:///system", prefix: "geminus-test-sw", directory: s.url, kernel: kernel,
                                             append: "pages=16", ramMiB: 16)
                domains = d
                try d.startPrimary()
                (extraA, extraB) = (["--domain", d.primary], ["--domain", d.standby])
            }
        }
        let (portA, portB) = (try Self.freePort(), try Self.freePort())
        let a = try AgentProcess(name: "A", executable: GeminusBinary.url,
                                 arguments: ["agent", "--arbitration", "none", "--role", "primary", "--listen", "127.0.0.1:\(portA)", "--peer", "127.0.0.1:\(portB)",
                                             "--status-socket", s.path("a.sock")] + common + extraA,
                                 logFile: s.url.appendingPathComponent("a.log"))
        defer { a.stop() }
        let b = try AgentProcess(name: "B", executable: GeminusBinary.url,
                                 arguments: ["agent", "--arbitration", "none", "--role", "secondary", "--listen", "127.0.0.1:\(portB)", "--peer", "127.0.0.1:\(portA)",
                                             "--status-socket", s.path("b.sock")] + common + extraB,
                                 logFile: s.url.appendingPathComponent("b.log"))
        defer { b.stop() }
        let logs = { "A:\n\((try? String(contentsOf: s.url.appendingPathComponent("a.log"), encoding: .utf8)) ?? "")\nB:\n\((try? String(contentsOf: s.url.appendingPathComponent("b.log"), encoding: .utf8)) ?? "")" }
        try #require(a.wait(for: .protected, timeoutSeconds: 60) != nil, "A never protected: \(logs())")

        // Asking the secondary is refused with where to ask instead.
        let wrong = try GeminusBinary.run(["failover", "ledger", "--socket", s.path("b.sock")])
        #expect(wrong.status == 1)
        #expect(wrong.stderr.contains("not its primary"), "\(wrong.stderr)")

        var generation = 1
        // The QEMU running the guest on the primary side (qemu only).
        var guestPID = a.last(.guestStarted)?["pid"] as? Int
        for (from, to, sock) in [(a, b, "a.sock"), (b, a, "b.sock")] {
            let (markFrom, markTo) = (from.eventCount, to.eventCount)
            let r = try GeminusBinary.run(["failover", "ledger", "--socket", s.path(sock), "--json"], timeoutSeconds: 90)
            let result = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
                                      "no JSON: \(r.stdout) \(r.stderr)\n\(logs())")
            #expect(r.status == 0 && result["ok"] as? Bool == true, "\(result)\n\(logs())")
            generation += 1
            #expect(result["generation"] as? Int == generation)

            let final = try #require(from.wait(for: .finalCheckpoint, timeoutSeconds: 5, from: markFrom))
            let took = try #require(to.wait(for: .tookOver, timeoutSeconds: 10, from: markTo), "\(logs())")
            #expect(took["planned"] as? Bool == true)
            #expect(took["fromEpoch"] as? Int == final["epoch"] as? Int)
            // Nothing lost: the guest resumes from the very counter it was paused at.
            #expect(took["counter"] as? Int == final["counter"] as? Int, "final checkpoint \(final), takeover \(took)")
            #expect(took["generation"] as? Int == generation)
            // S1: the old primary's copy is gone, not merely paused.
            if guest != "simulated" {
                let old = try #require(guestPID, "no guest pid reported")
                #expect(!Self.isRunning(pid: old), "the old primary's QEMU \(old) still runs after the handover")
                guestPID = took["guestPid"] as? Int
            }
            // The old primary follows the new one, which is protected again and runs on.
            let reprotected = try #require(to.wait(for: .protected, timeoutSeconds: 60, from: markTo), "not protected again: \(logs())")
            #expect((reprotected["epoch"] as? Int ?? 0) > (final["epoch"] as? Int ?? .max))
            #expect(from.wait(for: .baseCommitted, timeoutSeconds: 10, from: markFrom) != nil)
            let later = try #require(to.wait(for: .progress, timeoutSeconds: 5, from: to.eventCount))
            #expect((later["counter"] as? Int ?? 0) > (took["counter"] as? Int ?? .max), "the guest does not run on after the switchover")
            if let d = domains {
                // libvirt agrees: exactly one of the two definitions runs, the new primary's.
                // libvirt follows the private monitor's RESUME event on its own thread: its
                // view may trail the guest by a moment on a busy machine, so wait for it.
                let (running, stopped) = to === b ? (d.standby, d.primary) : (d.primary, d.standby)
                let (seen, _) = d.waitForState(of: running, timeoutSeconds: 5) { $0 == "running" }
                #expect(seen.last == "running", "\(running) went through \(seen) in 5 s")
                #expect(["shut off", "paused"].contains(d.state(of: stopped)), "\(stopped): \(d.state(of: stopped))")
            }
        }
    }
}
