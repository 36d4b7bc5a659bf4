import ArgumentParser
import Foundation
import GeminusDemo
import GeminusQEMU

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

    /// The mode asked for, or (by default) libvirt when it can be had, else simulated and why.
    func chooseMode(say: (String) -> Void) throws -> (DemoMode, kernel: String?, fallback: String?) {
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
        let settings = DemoSettings(mode: mode, kernel: guestKernel, agentExecutable: URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath(),
                                    append: append, uri: uri, durationSeconds: durationSeconds, intervalMillis: intervalMillis,
                                    takeoverAfterMillis: takeoverAfterMillis, ramMib: ramMib, dirtyRate: dirtyRate,
                                    outputsPerSecond: outputsPerSecond, seed: seed, dirtyPages: dirtyPages, verifyTracking: verifyTracking)
        say(settings.headline)
        let run = try DemoRun(settings: settings, say: say)
        if let fallback { run.fallbackReason = fallback }
        defer { run.cleanUp() }
        let summary = try run.execute()
        if json {
            let data = try JSONSerialization.data(withJSONObject: summary.json, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            for line in summary.reportLines { print(line) }
        }
        if !summary.passed { throw ExitCode(1) }
    }
}
