import ArgumentParser
import Foundation
import GeminusAgent
import GeminusAgentGuests
import GeminusCore
import GeminusHypervisor
import GeminusLibvirt
import GeminusLibvirtGuest
import GeminusNode
import GeminusQEMU
import GeminusReplication
import Logging

enum Role: String, ExpressibleByArgument, CaseIterable {
    case primary, secondary
}

/// What runs the VM: a libvirt domain (production), QEMU started directly by the agent, or
/// the simulated guest.
enum GuestKind: String, ExpressibleByArgument, CaseIterable {
    case simulated, qemu, libvirt
}

enum FirstCopy: String, ExpressibleByArgument, CaseIterable {
    case live, paused
}

extension PageContent: ExpressibleByArgument {}
extension DirtyPagePolicy.Method: ExpressibleByArgument {}
extension WriteTrackingReprotect: ExpressibleByArgument {}

struct Agent: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the Geminus agent for one protected VM (the daemon an operator runs on each host).",
        discussion: """
        The primary runs the VM and streams checkpoints to the secondary; the secondary keeps the \
        replica and resumes the VM when the primary is lost. With --guest libvirt the VM is a libvirt \
        domain (enrolled with `geminus enroll`): the primary attaches to it running, the secondary \
        starts a paused hot standby from its own definition of it. --guest qemu has each agent start \
        QEMU itself; --guest simulated (the default) needs neither.

        Example pair on one machine (no witness: --arbitration none; a real pair runs with
        its Corosync cluster and --peer-node-id, docs/ARBITRATION.md):
          geminus keygen --out /etc/geminus/pair.key
          geminus agent --arbitration none --role secondary --listen 127.0.0.1:7400 --key /etc/geminus/pair.key
          geminus agent --arbitration none --role primary --peer 127.0.0.1:7400 --key /etc/geminus/pair.key
        """)

    @Option(help: "primary or secondary.") var role: Role
    @Option(help: "Name of the protected VM; both agents must agree.") var vm = "demo"
    @Option(help: "Pair key file (mode 0600), the same on both hosts.") var key: String
    @Option(help: "Where this agent listens while it is the secondary (a primary given one becomes the secondary after a planned switchover; port 0 picks a free one).") var listen: Endpoint?
    @Option(help: "The other agent's --listen address, connected to while this agent is the primary (a secondary given one protects the VM there after taking over).") var peer: Endpoint?
    @Option(help: "Checkpoint interval in milliseconds.") var intervalMillis = 25
    @Option(help: "Secondary: silence from the primary, in milliseconds, after which it takes over.") var takeoverAfterMillis = 150
    @Option(help: "Primary: silence from the secondary, in milliseconds, after which the link is dropped.") var peerSilenceMillis = 150
    @Option(help: "Primary: after losing the secondary, hold output this long before running unprotected.") var unprotectAfterMillis = 300
    @Option(help: "Primary: epochs sent but not acknowledged before checkpoints wait.") var maxInFlight = 4
    @Option(help: "Primary: how the first copy to a secondary without a checkpoint is taken: live (rounds while the guest runs, then one short pause for what is still dirty) or paused (the whole RAM copied with the guest stopped). A secondary that holds a checkpoint always gets a paused copy, so its checkpoint stays whole until the new one commits.") var firstCopy = FirstCopy.live
    @Option(help: "Primary: bytes of guest output held awaiting acknowledgement; a full buffer stalls the guest.") var outputLimitBytes = 8 << 20
    @Option(help: "Send released guest output as UDP datagrams to this address.") var outputSink: Endpoint?
    @Option(help: "QEMU guest: give the guest a NIC (ne2k_isa) bridged to this host interface; its frames leave only once their checkpoint is acknowledged, the MAC is announced after a takeover (docs/NETWORK.md). Needs CAP_NET_RAW.") var nicBridge: String?
    @Option(help: "With --nic-bridge: the guest's MAC, the same on both hosts (default: derived from --vm).") var nicMac: String?
    @Option(help: "QEMU guest: give the guest a replicated raw disk of this many MiB (at most 256; the primary starts it zeroed): its writes reach the secondary's replica only when their epoch commits (docs/DISKS.md).") var diskMib: Int?
    @Option(help: "What runs the VM: simulated, libvirt (a domain, see --domain), or qemu (QEMU started by the agent under TCG).") var guest = GuestKind.simulated
    @Option(help: "libvirt guest: this host's domain of the VM (default: --vm). The primary's must be running; the secondary's defined and shut off (its standby is started from it).") var domain: String?
    @Option(help: "libvirt guest: connection URI.") var uri = LibvirtConnection.defaultURI
    @Option(help: "QEMU guest: the multiboot kernel to boot (e.g. the one Tools/guest-tiny/build.sh prints).") var kernel: String?
    @Option(help: "QEMU guest: the kernel command line.") var append = "pages=64"
    @Option(help: "Guest-physical address of the guest's progress counter (default: where the test guests keep it).") var counterAddress: Int?
    @Option(help: "How dirty pages are found: auto (write tracking when the kernel and QEMU allow it, else compare, said once in the log), tracking (refuse to start protecting a guest that cannot be tracked; a guest resumed on the standby falls back to compare), compare (every page against a shadow copy).") var dirtyPages = DirtyPagePolicy.Method.auto
    @Option(help: "Write tracking: re-protect written pages in the scan itself (in-scan: one atomic ioctl, the default, cheapest under TCG) or only the returned ranges (returned-ranges: under KVM, keeps KVM's mappings of unwritten RAM; not measurable here).") var trackingReprotect = WriteTrackingReprotect.inScan
    @Flag(help: "Check every write-tracked checkpoint against a full comparison and report any page tracking missed (a diagnostic: costs a compare per checkpoint).") var verifyTracking = false
    @Option(help: "Guest RAM in MiB.") var ramMib = 64
    @Option(help: "Simulated VM: pages written per second.") var dirtyRate = 20_000
    @Option(help: "Simulated VM: page content written (\(PageContent.allCases.map(\.rawValue).joined(separator: ", "))).") var content = PageContent.mixed
    @Option(help: "Simulated VM: fraction of the work area that takes 90% of the writes.") var hotFraction = 0.05
    @Option(help: "Simulated VM: output packets per second.") var outputsPerSecond = 500
    @Option(help: "Simulated VM: random seed.") var seed: UInt64 = 1
    @Option(help: "Stop after this many seconds (default: run until killed).") var durationSeconds: Double?
    @Flag(help: "Write machine-readable events, one JSON object per line, to standard output.") var events = false
    @Option(help: "Control socket answering `geminus status` and `geminus failover` (default /run/geminus/VM.sock).") var statusSocket: String?
    @Flag(help: ArgumentHelp("With --events: also one event per checkpoint and per acknowledgement.", visibility: .hidden)) var traceEpochs = false
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"
    @Option(help: "Who decides which host may run the VM: corosync (the default: a three-node cluster with `geminus witness` on the third, needs --peer-node-id; docs/ARBITRATION.md) or none (a partition can run the VM twice: one host and tests only).")
    var arbitration = ArbitrationChoice.corosync
    @Option(help: "With --arbitration corosync: the other host's nodeid in corosync.conf.") var peerNodeId: UInt32?
    @Option(help: "With --arbitration corosync: the CPG group the pair and the witness use.") var cpgGroup = "geminus-ca"
    @Option(help: "With --arbitration corosync: the witness host's nodeid in corosync.conf; only its publications are taken as the witness's (default: the node that is neither this one nor --peer-node-id).")
    var witnessNodeId: UInt32?

    func validate() throws {
        if role == .secondary && listen == nil {
            throw ValidationError("the secondary needs --listen HOST:PORT (the address the primary connects to)")
        }
        guard intervalMillis >= 1 && intervalMillis <= 10_000 else { throw ValidationError("--interval-millis must be 1...10000") }
        try InputCheck.name(vm, "--vm")
        if let domain { try InputCheck.name(domain, "--domain") }
        try InputCheck.millis(takeoverAfterMillis, "--takeover-after-millis")
        try InputCheck.millis(peerSilenceMillis, "--peer-silence-millis")
        try InputCheck.millis(unprotectAfterMillis, "--unprotect-after-millis")
        // One item is always held whatever the limit (OutputQueue), so 1 byte works; 0 cannot.
        try InputCheck.range(outputLimitBytes, "--output-limit-bytes", 1...(1 << 40), unit: "bytes")
        try InputCheck.range(ramMib, "--ram-mib", 1...InputCheck.maxRAMMiB, unit: "MiB")
        if let a = counterAddress, a < 0 || a > (ramMib << 20) - 8 {
            // An offset into the guest's RAM file (for a guest over 3 GiB on i440fx, RAM above
            // 4 GiB physical sits at 3 GiB in the file), read at every report: outside it, refuse.
            throw ValidationError("--counter-address \(a) is outside the guest's \(ramMib) MiB of RAM (an offset into its RAM: 0...\((ramMib << 20) - 8))")
        }
        guard takeoverAfterMillis >= 2 * intervalMillis else {
            throw ValidationError("--takeover-after-millis (\(takeoverAfterMillis)) must be at least twice --interval-millis (\(intervalMillis)), or every slow epoch looks like a dead primary")
        }
        if arbitration == .corosync && peerNodeId == nil {
            throw ValidationError("arbitration by Corosync (the default) needs --peer-node-id, the other host's nodeid in corosync.conf; on one host, or in tests, pass --arbitration none (a partition between two live hosts can then run the VM twice)")
        }
        if let w = witnessNodeId, w == peerNodeId {
            throw ValidationError("--witness-node-id \(w) is the peer's nodeid: the witness runs on the cluster's third node")
        }
        guard maxInFlight >= 1 && maxInFlight <= 64 else { throw ValidationError("--max-in-flight must be 1...64") }
        if let d = durationSeconds, !(d > 0 && d <= 365 * 86_400) { throw ValidationError("--duration-seconds must be positive (at most a year)") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
        if guest != .libvirt && domain != nil { throw ValidationError("--domain is for --guest libvirt") }
        if verifyTracking && (guest == .simulated || dirtyPages == .compare) {
            throw ValidationError("--verify-tracking checks write tracking: it needs --guest qemu or libvirt and --dirty-pages auto or tracking")
        }
        if nicBridge != nil && guest != .qemu {
            throw ValidationError("--nic-bridge wires a NIC into a QEMU the agent starts: it needs --guest qemu (a libvirt domain's held NICs and their bridges come from its enrolment, `geminus enroll --prepare`: docs/NETWORK.md)")
        }
        if nicMac != nil && nicBridge == nil { throw ValidationError("--nic-mac is for --nic-bridge") }
        if let n = diskMib {
            guard guest == .qemu else {
                throw ValidationError("--disk-mib gives a QEMU the agent starts a replicated disk: it needs --guest qemu (a libvirt domain's disk comes from its definition, enrolled with `geminus enroll`: docs/DISKS.md)")
            }
            let max = Int(DiskSetup.maxSizeBytes >> 20)
            guard n >= 1 && n <= max else {
                throw ValidationError("--disk-mib \(n) is not supported: 1...\(max) MiB (a full checkpoint carries the whole disk and the secondary stages it in memory; docs/DISKS.md)")
            }
        }
        if let m = nicMac {
            guard let mac = MACAddress(m), !mac.isMulticast else {
                throw ValidationError("--nic-mac '\(m)' is not a unicast MAC address like 52:54:00:12:34:56")
            }
        }
        if guest == .qemu {
            guard let kernel else {
                throw ValidationError("--guest qemu needs --kernel PATH (build the test guest with Tools/guest-tiny/build.sh)")
            }
            guard FileManager.default.isReadableFile(atPath: kernel) else {
                throw ValidationError("kernel \(kernel) does not exist or is not readable (build it with Tools/guest-tiny/build.sh)")
            }
            guard QEMULauncher.locate("qemu-system-x86_64") != nil else {
                throw ValidationError("qemu-system-x86_64 is not installed; fix: \(QEMULauncher.installHint)")
            }
        }
    }

    /// Started once the agent's own settings have been accepted, so a bad key or a busy port is
    /// what the operator hears about first.
    func serveStatus(_ status: AgentStatus) throws(GeminusError) -> StatusServer {
        try StatusServer(path: statusSocket ?? StatusServer.defaultPath(vm: vm), status: status)
    }

    var guestChoice: AgentGuests.Choice {
        AgentGuests.Choice(kind: AgentGuests.Kind(rawValue: guest.rawValue)!, vmName: vm, ramMiB: ramMib,
                           workload: SimulatedWorkload(ramMiB: ramMib, dirtyPagesPerSecond: dirtyRate, hotFraction: hotFraction,
                                                       content: content, outputsPerSecond: outputsPerSecond, seed: seed),
                           kernel: kernel, append: append, counterAddress: counterAddress, dirtyPages: dirtyPages,
                           verifyTracking: verifyTracking, trackingReprotect: trackingReprotect, nicBridge: nicBridge, nicMAC: nicMac,
                           diskMiB: diskMib, domain: domain, uri: uri, intervalMillis: intervalMillis)
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let eventLog = EventLog(enabled: events, role: role.rawValue)
        let stopper = StopOnSignal()
        let status = AgentStatus()
        status.update(["role": role.rawValue, "vm": vm, "state": "starting", "pid": Int(getpid())])
        do {
            let sink = try outputSink.map { e throws(GeminusError) in try OutputSink(host: e.host, port: e.port) }
            let guests = AgentGuests(guestChoice)
            let networks = try guests.openHostNetworks(logger: Logger(label: "geminus.network"))
            defer { for n in networks { n.stop() } }
            let server = try serveStatus(status)
            defer { server.close() }
            let arbitrated = try openArbitration(logger: Logger(label: "geminus.arbitration"), events: eventLog)
            defer { arbitrated.1?.stop() }
            let settings = AgentRuntime.Settings(
                vmName: vm, keyPath: key, role: role == .primary ? .primary : .secondary,
                listen: listen.map { ($0.host, $0.port) }, peer: peer.map { ($0.host, $0.port) },
                primary: primaryMachineConfig(.none), takeoverAfterNanos: UInt64(takeoverAfterMillis) * 1_000_000,
                outputLimitBytes: outputLimitBytes, counterAddress: guests.choice.guestCounterAddress, traceEpochs: traceEpochs,
                deadlineNanos: durationSeconds.map { Monotonic.nanos() + UInt64($0 * 1e9) } ?? .max)
            try AgentRuntime(settings: settings, host: guests, arbitration: arbitrated.0, witness: arbitrated.1,
                             output: AgentOutputDestination(sink: sink, networks: networks), status: status, server: server,
                             events: eventLog, stopper: stopper).run()
        } catch {
            eventLog.emit(.error, ["message": "\(error)"])
            throw operatorFailure(error)
        }
    }

    func primaryMachineConfig(_ arbitration: Arbitration) -> PrimaryMachine.Config {
        PrimaryMachine.Config(epochIntervalNanos: UInt64(intervalMillis) * 1_000_000, maxEpochsInFlight: maxInFlight,
                              peerSilenceNanos: UInt64(peerSilenceMillis) * 1_000_000,
                              unprotectAfterNanos: UInt64(unprotectAfterMillis) * 1_000_000, arbitration: arbitration,
                              liveFirstCopy: firstCopy == .live)
    }
}
