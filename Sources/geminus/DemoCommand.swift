import ArgumentParser
import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusTransport

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replicate a VM between two agents on this machine, kill the primary, and prove the secondary carries on.",
        discussion: """
        Starts `geminus agent --role secondary` and `geminus agent --role primary` as two processes on \
        loopback, replicates for a few seconds with live progress, kills the primary with SIGKILL at a \
        random moment, and checks that the resumed VM continues from the last acknowledged checkpoint \
        and that no output was ever released that the resumed VM does not stand behind. Exits 1 if a \
        check fails. This release replicates the simulated VM; the real libvirt/QEMU demo comes next.
        """)

    @Flag(help: "Use the simulated VM (the default in this release).") var simulated = false
    @Flag(help: "Replicate a real QEMU guest (TCG) instead: each agent starts its own QEMU; needs --kernel.") var qemu = false
    @Option(help: "With --qemu: the multiboot test guest to boot (Tools/guest-tiny/build.sh prints its path; Tools/demo --qemu builds it).") var kernel: String?
    @Option(help: "With --qemu: the guest's command line (pages written per loop, etc.).") var append = "pages=64"

    @Option(help: "Seconds of replication before the primary is killed.") var durationSeconds = 5.0
    @Option(help: "Checkpoint interval in milliseconds.") var intervalMillis = 25
    @Option(help: "Silence in milliseconds after which the secondary takes over.") var takeoverAfterMillis = 150
    @Option(help: "Guest RAM in MiB.") var ramMib = 64
    @Option(help: "Pages the guest writes per second.") var dirtyRate = 20_000
    @Option(help: "Output packets the guest sends per second.") var outputsPerSecond = 500
    @Option(help: "Seed for the guest and the kill moment.") var seed: UInt64 = UInt64(UInt32.random(in: 1...UInt32.max))
    @Flag(help: "Print the summary as JSON (progress goes to standard error).") var json = false

    func validate() throws {
        guard durationSeconds >= 1 && durationSeconds <= 3600 else { throw ValidationError("--duration-seconds must be 1...3600") }
        guard takeoverAfterMillis >= 2 * intervalMillis else { throw ValidationError("--takeover-after-millis must be at least twice --interval-millis") }
        if simulated && qemu { throw ValidationError("choose one of --simulated and --qemu") }
        if qemu && kernel == nil { throw ValidationError("--qemu needs --kernel PATH; Tools/demo --qemu builds the test guest and passes it") }
    }

    func run() throws {
        let say: (String) -> Void = { line in
            // Unbuffered, so progress shows live even through a pipe.
            (json ? FileHandle.standardError : FileHandle.standardOutput).write(Data((line + "\n").utf8))
        }
        if qemu {
            say("Geminus demo: a \(ramMib) MiB QEMU guest (\(kernel!), '\(append)') under TCG, checkpointed every \(intervalMillis) ms")
        } else {
            say("Geminus demo: a simulated \(ramMib) MiB VM writing \(dirtyRate) pages/s, checkpointed every \(intervalMillis) ms (seed \(seed))")
        }
        let run = try DemoRun(settings: self, say: say)
        defer { run.cleanUp() }
        let summary = try run.execute()
        if json {
            let data = try JSONSerialization.data(withJSONObject: summary.json, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            summary.printReport()
        }
        if !summary.passed { throw ExitCode(1) }
    }
}

/// Receives the datagrams agents release to "the network" and remembers them in order.
final class OutputObserver: @unchecked Sendable {
    struct Packet { var generation: UInt64; var packet: OutputPacket }
    let fd: Int32
    let port: UInt16
    private let lock = NSLock()
    private var packets: [Packet] = []
    private var malformed = 0

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        self.fd = fd
        var size: Int32 = 8 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, 4)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard ok else { throw GeminusError(.io, "cannot bind the demo's observer socket on 127.0.0.1") }
        port = UInt16(bigEndian: addr.sin_port)
        let t = Thread { [self] in
            var buf = [UInt8](repeating: 0, count: 2048)
            while true {
                let n = recv(fd, &buf, buf.count, 0)
                if n <= 0 { return }
                var r = ByteReader(Array(buf[0..<n]))
                guard let g = r.u64(), let rest = r.take(r.remaining), let p = OutputPacket(decoding: Array(rest)) else {
                    lock.lock(); malformed += 1; lock.unlock(); continue
                }
                lock.lock(); packets.append(Packet(generation: g, packet: p)); lock.unlock()
            }
        }
        t.start()
    }

    var snapshot: (packets: [Packet], malformed: Int) { lock.lock(); defer { lock.unlock() }; return (packets, malformed) }
    func close() { shutdown(fd, Int32(SHUT_RDWR)); Glibc.close(fd) }
}

struct DemoSummary {
    var checks: [(name: String, passed: Bool, detail: String)] = []
    var figures: [String: Any] = [:]
    var passed: Bool { !checks.isEmpty && checks.allSatisfy(\.passed) }

    mutating func check(_ name: String, _ ok: Bool, _ detail: String) { checks.append((name, ok, detail)) }

    var json: [String: Any] {
        var j = figures
        j["passed"] = passed
        j["checks"] = checks.map { ["name": $0.name, "passed": $0.passed, "detail": $0.detail] }
        return j
    }

    func printReport() {
        print("")
        print("Summary")
        for key in figures.keys.sorted() { print("  \(key): \(figures[key]!)") }
        print("")
        for c in checks { print("  [\(c.passed ? "PASS" : "FAIL")] \(c.name): \(c.detail)") }
        print("")
        print(passed ? "All checks passed." : "SOME CHECKS FAILED.")
    }
}
