import ArgumentParser
import Foundation
import GeminusDemo
import GeminusQEMU

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replicate a VM between two agents on this machine, kill the primary, and prove the secondary carries on.",
        discussion: """
        By default (--linux) the Linux test guest (Debian's cloud kernel, a transaction service on a \
        virtio NIC and disk) as a libvirt domain enrolled with `geminus enroll --prepare`, a second \
        definition of it as the standby's, and a client in a network namespace sending transactions: \
        the pair protects it, the primary agent and its QEMU are SIGKILLed, the standby resumes it, the \
        client carries on, and every acknowledged transaction is looked up in the resumed guest's log \
        (none lost, none applied twice) and its disk compared with its RAM. Root only; it runs \
        Tools/guest-linux/kill-test --kills 1 of the source tree and takes about a minute. \
        Exits 1 if a check fails, e.g. an acknowledged transaction was lost.

        --tiny: the tiny test guest as a libvirt domain (starting libvirtd first if it does not \
        answer, installing it with apt-get if needed; root only), replicated for a few seconds with \
        live progress, the primary killed at a random moment; checks that the standby resumed from \
        the last acknowledged checkpoint and runs on, and that the old copy is dead. When a real VM \
        cannot be had it says why and replicates the simulated VM instead (which also checks output \
        commit: no packet released ahead of its checkpoint).
        """)

    @Flag(help: "The Linux guest with a client's transactions crossing the failover (the default; root).") var linux = false
    @Flag(help: "The tiny test guest (libvirt, else the simulated VM) instead of the Linux guest.") var tiny = false
    @Option(help: "Linux guest: the directory Tools/guest-linux/build.sh built it into (Tools/demo passes it). Without it the demo builds it.") var linuxGuest: String?

    @Flag(help: "Tiny demo: replicate the simulated VM (no QEMU or libvirt needed).") var simulated = false
    @Flag(help: "Tiny demo: replicate a libvirt domain (its default); fail rather than fall back when that cannot be done.") var libvirt = false
    @Flag(help: "Tiny demo: replicate a QEMU guest each agent starts itself, without libvirt; needs --kernel.") var qemu = false
    @Option(help: "Tiny demo: the multiboot test guest to boot (Tools/guest-tiny/build.sh prints its path; Tools/demo builds it). Without it the demo looks for Tools/guest-tiny beside the binary.") var kernel: String?
    @Option(help: "Tiny demo: the test guest's command line (pages written per loop, etc.).") var append = "pages=64"
    @Option(help: "Tiny demo: libvirt connection URI (the Linux demo uses qemu:///system).") var uri = "qemu:///system"

    @Option(help: "Seconds of protected running before the primary is killed (the Linux demo adds up to 1 s at random).") var durationSeconds = 5.0
    @Option(help: "Checkpoint interval in milliseconds (default: 50 for the Linux guest, 25 for the tiny one).") var intervalMillis: Int?
    @Option(help: "Tiny demo: silence in milliseconds after which the secondary takes over.") var takeoverAfterMillis = 150
    @Option(help: "Guest RAM in MiB (default: 128 for the Linux guest, 64 for the tiny one).") var ramMib: Int?
    @Option(help: "Simulated VM: pages the guest writes per second.") var dirtyRate = 20_000
    @Option(help: "Simulated VM: output packets the guest sends per second.") var outputsPerSecond = 500
    @Option(help: "Seed for the guest, the client and the kill moment.") var seed: UInt64 = UInt64(UInt32.random(in: 1...UInt32.max))
    @Option(help: "Tiny demo, real guests: how the agents find dirty pages (auto, tracking, compare).") var dirtyPages = DirtyPagePolicy.Method.auto
    @Flag(help: "Tiny demo, real guests: check every write-tracked checkpoint against a full comparison; a missed page fails the demo.") var verifyTracking = false
    @Flag(help: "Print the summary as JSON (progress goes to standard error).") var json = false

    /// The options only the tiny-guest demo has that were given: they choose it.
    var tinyOptions: [String] {
        [("--simulated", simulated), ("--qemu", qemu), ("--libvirt", libvirt), ("--kernel", kernel != nil)].filter(\.1).map(\.0)
    }

    func guest() throws -> DemoGuest {
        do { return try DemoGuest.choose(linux: linux, tiny: tiny, tinyOptions: tinyOptions) } catch let e as DemoFailure { throw ValidationError(e.description) }
    }

    func validate() throws {
        guard durationSeconds >= 1 && durationSeconds <= 3600 else { throw ValidationError("--duration-seconds must be 1...3600") }
        if let intervalMillis, !(1...10_000).contains(intervalMillis) { throw ValidationError("--interval-millis must be 1...10000") }
        try InputCheck.millis(takeoverAfterMillis, "--takeover-after-millis")
        if let ramMib { try InputCheck.range(ramMib, "--ram-mib", 1...InputCheck.maxRAMMiB, unit: "MiB") }
        switch try guest() {
        case .linux:
            if let dir = linuxGuest, !FileManager.default.fileExists(atPath: dir + "/vmlinuz") {
                throw ValidationError("--linux-guest \(dir) has no vmlinuz: pass the directory Tools/guest-linux/build.sh built into")
            }
            if uri != "qemu:///system" { throw ValidationError("the Linux demo runs on qemu:///system only (its kill test does); drop --uri, or use --tiny") }
        case .tiny:
            guard takeoverAfterMillis >= 2 * (intervalMillis ?? 25) else { throw ValidationError("--takeover-after-millis must be at least twice --interval-millis") }
            if [simulated, qemu, libvirt].filter({ $0 }).count > 1 { throw ValidationError("choose one of --simulated, --libvirt and --qemu") }
            if qemu && kernel == nil { throw ValidationError("--qemu needs --kernel PATH; Tools/demo --qemu builds the test guest and passes it") }
            if linuxGuest != nil { throw ValidationError("--linux-guest is for the Linux demo; drop it with --tiny") }
        }
    }

    func run() throws {
        let say: (String) -> Void = { line in
            // Unbuffered, so progress shows live even through a pipe.
            (json ? FileHandle.standardError : FileHandle.standardOutput).write(Data((line + "\n").utf8))
        }
        let me = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        let summary: DemoSummary
        switch try guest() {
        case .linux:
            let demo = LinuxDemo(geminus: me, guestDirectory: linuxGuest, killAfterSeconds: durationSeconds,
                                 intervalMillis: intervalMillis ?? 50, ramMib: ramMib ?? 128, seed: seed,
                                 progressDescriptor: json ? 2 : 1)
            let killTest = try demo.preflight()
            say(demo.headline)
            summary = try demo.run(killTest)
        case .tiny:
            summary = try runTiny(executable: me, say: say)
        }
        if json {
            let data = try JSONSerialization.data(withJSONObject: summary.json, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            for line in summary.reportLines { print(line) }
        }
        if !summary.passed { throw ExitCode(1) }
    }

    func runTiny(executable: URL, say: @escaping (String) -> Void) throws -> DemoSummary {
        let (mode, guestKernel, fallback) = try DemoMode.choose(simulated: simulated, qemu: qemu, libvirt: libvirt, kernel: kernel, uri: uri, say: say)
        let settings = DemoSettings(mode: mode, kernel: guestKernel, agentExecutable: executable,
                                    append: append, uri: uri, durationSeconds: durationSeconds, intervalMillis: intervalMillis ?? 25,
                                    takeoverAfterMillis: takeoverAfterMillis, ramMib: ramMib ?? 64, dirtyRate: dirtyRate,
                                    outputsPerSecond: outputsPerSecond, seed: seed, dirtyPages: dirtyPages, verifyTracking: verifyTracking)
        say(settings.headline)
        let run = try DemoRun(settings: settings, say: say)
        if let fallback { run.fallbackReason = fallback }
        defer { run.cleanUp() }
        return try run.execute()
    }
}
