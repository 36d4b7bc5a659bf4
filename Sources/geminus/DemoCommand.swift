import ArgumentParser
import Foundation
import GeminusQEMU
import GeminusCore
import GeminusHypervisor
import GeminusTransport

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replicate a VM between two agents on this machine, kill the primary, and prove the secondary carries on.",
        discussion: """
        By default a real VM: the tiny test guest as a libvirt domain (TCG), with a second definition \
        of it as the standby's. Starts libvirtd first if it does not answer (installing it with \
        apt-get if needed; root only), starts `geminus agent --role secondary` and `--role primary` \
        as two processes on loopback, replicates for a few seconds with live progress, kills the \
        primary agent and its QEMU with SIGKILL at a random moment, and checks that the standby \
        resumed from the last acknowledged checkpoint and runs on, and that the old copy is dead. \
        When a real VM cannot be had it says why and replicates the simulated VM instead (which \
        also checks output commit: no packet released ahead of its checkpoint). Exits 1 if a check fails.
        """)

    @Flag(help: "Replicate the simulated VM (no QEMU or libvirt needed).") var simulated = false
    @Flag(help: "Replicate a libvirt domain (the default); fail rather than fall back when that cannot be done.") var libvirt = false
    @Flag(help: "Replicate a QEMU guest each agent starts itself, without libvirt; needs --kernel.") var qemu = false
    @Option(help: "The multiboot test guest to boot (Tools/guest-tiny/build.sh prints its path; Tools/demo builds it). Without it the demo looks for Tools/guest-tiny beside the binary.") var kernel: String?
    @Option(help: "The test guest's command line (pages written per loop, etc.).") var append = "pages=64"
    @Option(help: "libvirt connection URI.") var uri = "qemu:///system"

    @Option(help: "Seconds of replication before the primary is killed.") var durationSeconds = 5.0
    @Option(help: "Checkpoint interval in milliseconds.") var intervalMillis = 25
    @Option(help: "Silence in milliseconds after which the secondary takes over.") var takeoverAfterMillis = 150
    @Option(help: "Guest RAM in MiB.") var ramMib = 64
    @Option(help: "Pages the guest writes per second.") var dirtyRate = 20_000
    @Option(help: "Output packets the guest sends per second.") var outputsPerSecond = 500
    @Option(help: "Seed for the guest and the kill moment.") var seed: UInt64 = UInt64(UInt32.random(in: 1...UInt32.max))
    @Option(help: "Real guests: how the agents find dirty pages (auto, tracking, compare).") var dirtyPages = DirtyPagePolicy.Method.auto
    @Flag(help: "Real guests: check every write-tracked checkpoint against a full comparison; a missed page fails the demo.") var verifyTracking = false
    @Flag(help: "Print the summary as JSON (progress goes to standard error).") var json = false

    func validate() throws {
        guard durationSeconds >= 1 && durationSeconds <= 3600 else { throw ValidationError("--duration-seconds must be 1...3600") }
        guard takeoverAfterMillis >= 2 * intervalMillis else { throw ValidationError("--takeover-after-millis must be at least twice --interval-millis") }
        if [simulated, qemu, libvirt].filter({ $0 }).count > 1 { throw ValidationError("choose one of --simulated, --libvirt and --qemu") }
        if qemu && kernel == nil { throw ValidationError("--qemu needs --kernel PATH; Tools/demo --qemu builds the test guest and passes it") }
    }

    enum Mode: String { case simulated, qemu, libvirt }

    /// The mode asked for, or (by default) libvirt when it can be had, else simulated and why.
    func chooseMode(say: (String) -> Void) throws -> (Mode, kernel: String?, fallback: String?) {
        if simulated { return (.simulated, nil, nil) }
        if qemu { return (.qemu, kernel, nil) }
        var why = LibvirtSetup.ensure(uri: uri, say: say)
        var guest = kernel
        if why == nil && guest == nil {
            switch TestGuestLocator.tinyGuest(say: say) {
            case .success(let path): guest = path
            case .failure(let reason): why = reason.description
            }
        }
        if let why {
            if libvirt { throw OperatorError(description: "cannot run the libvirt demo: \(why)") }
            say("NOTE: replicating the SIMULATED VM instead of a real one: \(why)")
            return (.simulated, nil, why)
        }
        return (.libvirt, guest, nil)
    }

    func run() throws {
        let say: (String) -> Void = { line in
            // Unbuffered, so progress shows live even through a pipe.
            (json ? FileHandle.standardError : FileHandle.standardOutput).write(Data((line + "\n").utf8))
        }
        let (mode, guestKernel, fallback) = try chooseMode(say: say)
        switch mode {
        case .libvirt:
            say("Geminus demo: a \(ramMib) MiB libvirt domain (test guest \(guestKernel!), '\(append)') under TCG, checkpointed every \(intervalMillis) ms")
        case .qemu:
            say("Geminus demo: a \(ramMib) MiB QEMU guest (\(guestKernel!), '\(append)') under TCG, checkpointed every \(intervalMillis) ms")
        case .simulated:
            say("Geminus demo: a simulated \(ramMib) MiB VM writing \(dirtyRate) pages/s, checkpointed every \(intervalMillis) ms (seed \(seed))")
        }
        let run = try DemoRun(settings: self, mode: mode, kernel: guestKernel, say: say)
        if let fallback { run.fallbackReason = fallback }
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
    /// Datagrams that are no simulated-guest packet: a QEMU guest's console lines, by generation.
    private var console: [(generation: UInt64, text: String)] = []

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
                    var whole = ByteReader(Array(buf[0..<n]))
                    let generation = whole.u64() ?? 0
                    let line = n > 8 ? String(decoding: buf[8..<n], as: UTF8.self) : ""
                    lock.lock(); malformed += 1; console.append((generation, line)); lock.unlock()
                    continue
                }
                lock.lock(); packets.append(Packet(generation: g, packet: p)); lock.unlock()
            }
        }
        t.start()
    }

    var snapshot: (packets: [Packet], malformed: Int) { lock.lock(); defer { lock.unlock() }; return (packets, malformed) }
    var consoleLines: [(generation: UInt64, text: String)] { lock.lock(); defer { lock.unlock() }; return console }
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
