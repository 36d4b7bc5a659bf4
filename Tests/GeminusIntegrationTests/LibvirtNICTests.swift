import CGeminusSupport
import Foundation
import GeminusLibvirt
import GeminusTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// An enrolled libvirt domain's NIC, end to end: the tiny guest as a libvirt domain whose
/// `<interface type='bridge'>` `prepare` moved to the agent's socket, a primary and a secondary
/// agent, and an observer on a veth port of that bridge. Checked: the guest's frames reach the
/// bridge while protected; frames from the network reach the guest (the observer answers its ARP
/// for the sink, and only then does it send its numbered UDP datagrams); with the secondary
/// stopped (SIGSTOP: no acknowledgements, the primary keeps holding) nothing is released, and
/// once it runs again the held frames come out at once; after the primary host dies (agent and
/// QEMU SIGKILLed) the secondary's QEMU announces the MAC (RARP) and the guest's frames leave
/// through the secondary, on the bridge recorded at enrolment. The domain has a second NIC on a
/// second bridge (QEMU's, not driven by the guest): its frames cross the output port tagged, and
/// its MAC is announced on its own bridge only.
@Suite(.serialized) struct LibvirtNICTests {
    static let guestMAC: [UInt8] = [0x52, 0x54, 0x00, 0x6e, 0x69, 0x63]
    static let secondMAC: [UInt8] = [0x52, 0x54, 0x00, 0x6e, 0x69, 0x64]
    static let sinkMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x04]
    static let guestIP: [UInt8] = [10, 77, 0, 100]
    static let sinkIP: [UInt8] = [10, 77, 0, 4]

    static func sh(_ command: String) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return -1 }
        p.waitUntilExit()
        return p.terminationStatus
    }

    @Test func framesAreHeldUntilAcknowledgedAndMoveWithTheGuest() throws {
        if TinyGuest.skipRequested { print("LibvirtNICTests: skipped (GEMINUS_SKIP_VM_TESTS=1)"); return }
        guard getuid() == 0 else {
            Issue.record("needs root (a bridge, a veth pair, raw sockets, libvirt's system connection); set GEMINUS_SKIP_VM_TESTS=1 to skip")
            return
        }
        guard let kernel = try TinyGuest.kernel() else { return }
        let tag = String(format: "%05x", getpid() & 0xfffff)
        let (bridge, port, observerEnd) = ("gnbr\(tag)", "gnv\(tag)a", "gnv\(tag)b")
        let (bridge2, port2, observerEnd2) = ("gnbs\(tag)", "gnw\(tag)a", "gnw\(tag)b")
        defer { _ = Self.sh("ip link del \(port) 2>/dev/null; ip link del \(bridge) 2>/dev/null; ip link del \(port2) 2>/dev/null; ip link del \(bridge2) 2>/dev/null") }
        for (b, p, o) in [(bridge, port, observerEnd), (bridge2, port2, observerEnd2)] {
            guard Self.sh("ip link add \(b) type bridge && ip link set \(b) up && ip link add \(p) type veth peer name \(o) && ip link set \(p) master \(b) && ip link set \(p) up && ip link set \(o) up") == 0 else {
                Issue.record("cannot create bridge \(b) and veth \(p)/\(o) (ip link): needs root and iproute2; set GEMINUS_SKIP_VM_TESTS=1 to skip")
                return
            }
        }
        let observer = try Observer(interface: observerEnd, mac: Self.guestMAC)
        defer { observer.stop() }
        let observer2 = try Observer(interface: observerEnd2, mac: Self.secondMAC)
        defer { observer2.stop() }

        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        let hex = { (a: [UInt8]) in String(format: "0x%02x%02x%02x%02x", a[0], a[1], a[2], a[3]) }
        let append = "pages=16 net=1 ip=\(hex(Self.guestIP)) sink_ip=\(hex(Self.sinkIP)) sink_port=7777 send_every=16384"
        let text = { (m: [UInt8]) in m.map { String(format: "%02x", $0) }.joined(separator: ":") }
        let domains: TestGuestDomains
        do {
            domains = try TestGuestDomains(uri: "qemu:///system", prefix: "geminus-test-nic", directory: s.url, kernel: kernel,
                                           append: append, ramMiB: 16, nics: [(bridge, text(Self.guestMAC)), (bridge2, text(Self.secondMAC))])
        } catch {
            Issue.record("cannot define the test domains (is libvirtd running? Tools/start-libvirt as root): \(error); set GEMINUS_SKIP_VM_TESTS=1 to skip")
            return
        }
        defer { domains.remove() }
        // Enrolment recorded the bridge and moved the interface to QEMU's loopback socket.
        let definition = try domains.connection.xml(of: try domains.connection.lookupDomain(named: domains.primary), .persistent)
        let record = try #require(try HeldInterfaces.find(inDomainXML: definition))
        #expect(record.interfaces.map(\.attachment) == [.bridge(bridge), .bridge(bridge2)])
        #expect(definition.contains("type=\"server\"") || definition.contains("type='server'"))
        try domains.startPrimary()

        let (portA, portB) = (try PlannedSwitchoverTests.freePort(), try PlannedSwitchoverTests.freePort())
        let common = ["--vm", "nicvm", "--key", key, "--events", "--log-level", "info", "--ram-mib", "16", "--guest", "libvirt",
                      "--arbitration", "none", "--interval-millis", "25", "--peer-silence-millis", "10000", "--unprotect-after-millis", "60000"]
        let a = try AgentProcess(name: "A", executable: GeminusBinary.url,
                                 arguments: ["agent", "--role", "primary", "--peer", "127.0.0.1:\(portB)", "--status-socket", s.path("a.sock"),
                                             "--domain", domains.primary] + common,
                                 logFile: s.url.appendingPathComponent("a.log"))
        defer { a.stop() }
        let b = try AgentProcess(name: "B", executable: GeminusBinary.url,
                                 arguments: ["agent", "--role", "secondary", "--listen", "127.0.0.1:\(portB)", "--status-socket", s.path("b.sock"),
                                             "--domain", domains.standby, "--takeover-after-millis", "300"] + common,
                                 logFile: s.url.appendingPathComponent("b.log"))
        defer { b.kill(SIGCONT); b.stop() }
        let logs = { "A:\n\((try? String(contentsOf: s.url.appendingPathComponent("a.log"), encoding: .utf8)) ?? "")\nB:\n\((try? String(contentsOf: s.url.appendingPathComponent("b.log"), encoding: .utf8)) ?? "")" }
        try #require(a.wait(for: .protected, timeoutSeconds: 60) != nil, "A never protected: \(logs())")

        // Protected: the guest's frames come out (its ARP for the sink, answered by the observer,
        // then its numbered datagrams: the answer reached the guest).
        try #require(observer.waitFor(timeoutSeconds: 20) { $0.contains { $0.isDatagram } }, "no datagram from the guest: frames \(observer.summary)\n\(logs())")

        // The secondary stops acknowledging: the primary holds every frame.
        b.kill(SIGSTOP)
        Thread.sleep(forTimeInterval: 0.3)   // acknowledgements already on their way
        let holdStart = Date()
        Thread.sleep(forTimeInterval: 2.0)
        let holdEnd = Date()
        let duringHold = observer.frames.filter { $0.at > holdStart && $0.at <= holdEnd }
        #expect(duringHold.isEmpty, "\(duringHold.count) frames released while no checkpoint was acknowledged")
        b.kill(SIGCONT)
        // Acknowledged again: what was held comes out, nothing lost: the guest's datagram numbers
        // run on without a gap across the hold (the guest kept running and sending during it).
        #expect(observer.waitFor(timeoutSeconds: 5) { $0.filter { $0.at > holdEnd && $0.isDatagram }.count >= 3 },
                "held frames not released after the acknowledgements resumed: \(observer.summary)\n\(logs())")
        let burst = observer.frames.filter { $0.at > holdEnd && $0.at < holdEnd.addingTimeInterval(1) }.count
        let seqs = observer.frames.compactMap(\.seq)
        #expect(zip(seqs, seqs.dropFirst()).allSatisfy { $1 == $0 + 1 }, "datagram numbers not contiguous across the hold: \(seqs)")
        let before = observer.frames.filter { $0.at <= holdStart }.count
        print("LibvirtNICTests: \(before) frames before the hold, \(duringHold.count) during 2 s without acknowledgements, \(burst) in the second after; datagrams \(seqs.first ?? 0)...\(seqs.last ?? 0), none missing")
        try #require(a.wait(for: .protected, timeoutSeconds: 30, from: 0) != nil)

        // The primary host dies: its agent and its QEMU.
        let pid = a.last(.guestStarted)?["pid"] as? Int
        let marker = Date()
        a.kill(SIGKILL)
        if let pid { kill(pid_t(pid), SIGKILL) }
        let took = try #require(b.wait(for: .tookOver, timeoutSeconds: 20), "no takeover: \(logs())")
        #expect(took["nics"] as? Int == 2, "\(took)")
        // The resumed guest's MAC is announced (RARP from QEMU's announce-self) and its frames
        // leave through the secondary's agent.
        #expect(observer.waitFor(timeoutSeconds: 5) { $0.contains { $0.at > marker && $0.etherType == 0x8035 } },
                "no RARP announcement after the takeover: \(observer.summary)\n\(logs())")
        #expect(observer.waitFor(timeoutSeconds: 10) { $0.contains { $0.at > marker && $0.isDatagram } },
                "no datagram from the resumed guest: \(observer.summary)\n\(logs())")
        // The second NIC: announced on its own bridge, and nothing of the first NIC there.
        #expect(observer2.waitFor(timeoutSeconds: 5) { $0.contains { $0.at > marker && $0.etherType == 0x8035 } },
                "no RARP for the second NIC on \(bridge2): \(observer2.summary)\n\(logs())")
        #expect(observer2.frames.allSatisfy { !$0.isDatagram }, "the first NIC's datagrams reached the second NIC's bridge")
        print("LibvirtNICTests: takeover \(took["fromEpoch"] ?? "?"), after it: \(observer.frames.filter { $0.at > marker }.count) frames, \(observer.frames.filter { $0.at > marker && $0.etherType == 0x8035 }.count) RARP; in all \(observer.summary); second NIC: \(observer2.summary)")
    }
}

/// A raw socket on the observer's veth end: records the frames from `mac` and answers their ARP
/// requests for the sink.
final class Observer: @unchecked Sendable {
    struct Seen {
        var at: Date
        var etherType: Int
        var isDatagram: Bool
        /// The guest's datagram number (`seq=N counter=C`).
        var seq: Int?
    }
    private let fd: Int32
    private let lock = NSCondition()
    private var seen: [Seen] = []
    private var stopped = false

    let mac: [UInt8]

    init(interface: String, mac: [UInt8]) throws {
        self.mac = mac
        fd = geminus_packet_open(interface)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: -fd) ?? .EPERM) }
        let t = Thread { [self] in loop() }
        t.start()
    }

    var frames: [Seen] { lock.withLock { seen } }
    var summary: String {
        let f = frames
        return "\(f.count) frames (\(f.filter(\.isDatagram).count) datagrams, \(f.filter { $0.etherType == 0x8035 }.count) RARP)"
    }

    func waitFor(timeoutSeconds: Double, _ done: ([Seen]) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        lock.lock()
        defer { lock.unlock() }
        while !done(seen) {
            if !lock.wait(until: deadline) { return done(seen) }
        }
        return true
    }

    func stop() {
        lock.withLock { stopped = true }
        shutdown(fd, Int32(SHUT_RDWR))
    }

    private func loop() {
        var buf = [UInt8](repeating: 0, count: 2048)
        while !lock.withLock({ stopped }) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            var outgoing: Int32 = 0
            let n = Int(buf.withUnsafeMutableBytes { geminus_packet_receive(fd, $0.baseAddress, $0.count, &outgoing) })
            guard n >= 14, outgoing == 0, Array(buf[6..<12]) == mac else { continue }
            let f = Array(buf[0..<n])
            let type = Int(f[12]) << 8 | Int(f[13])
            // IPv4 UDP to the sink's port 7777.
            let datagram = type == 0x0800 && n >= 42 && f[23] == 17 && Int(f[36]) << 8 | Int(f[37]) == 7777
            lock.withLock {
                var seq: Int?
                if datagram, let text = String(bytes: f[42...], encoding: .ascii), let r = text.range(of: "seq=") {
                    seq = Int(text[r.upperBound...].prefix { $0.isNumber })
                }
                seen.append(Seen(at: Date(), etherType: type, isDatagram: datagram, seq: seq))
                lock.broadcast()
            }
            // ARP request (op 1) for the sink's address: answer it.
            if type == 0x0806, n >= 42, f[21] == 1, Array(f[38..<42]) == LibvirtNICTests.sinkIP {
                var reply = Array(f[6..<12]) + LibvirtNICTests.sinkMAC + [0x08, 0x06]
                reply += [0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x02]
                reply += LibvirtNICTests.sinkMAC + LibvirtNICTests.sinkIP + Array(f[22..<28]) + Array(f[28..<32])
                reply += [UInt8](repeating: 0, count: 60 - reply.count)
                _ = reply.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
            }
        }
    }
}
