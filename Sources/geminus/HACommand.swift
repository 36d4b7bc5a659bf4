import ArgumentParser
import Foundation
import GeminusCore
import GeminusHA
import GeminusHAHost
import GeminusLibvirt
import Logging

/// `geminus ha …`: the HA path (restart on a surviving node after fencing) for VMs without CA.
struct HA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ha",
        abstract: "High availability: restart VMs on a surviving node after their host is fenced.",
        discussion: """
        Every node runs `geminus ha agent` beside Corosync. A domain is HA-protected by metadata in \
        its libvirt definition (`geminus ha add`), so the definition a surviving node starts it from \
        carries the protection with it. Disks must be on storage every node reaches. See docs/HA.md.
        """,
        subcommands: [HAAdd.self, HARemove.self, HAStatus.self, HAAgent.self])
}

struct HAStateDirOption: ParsableArguments {
    @Option(help: "The HA agent's state directory (status and requests).") var stateDir = "/run/geminus/ha"
}

struct HAAdd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "add", abstract: "HA-protect a domain of this node.")

    @Argument(help: "The VM (the libvirt domain, without the agent's --domain-prefix).") var domain: String
    @Option(help: "Restart order after a failure: higher first; equal priorities go biggest first.") var priority = 0
    @OptionGroup var state: HAStateDirOption

    func validate() throws {
        try InputCheck.name(domain, "domain")
    }

    func run() throws {
        do {
            try HAAdmin.protect(domain: domain, priority: priority, stateDir: state.stateDir)
            print("\(domain) is HA-protected (priority \(priority)); the agent reports it within a scan interval")
        } catch {
            throw operatorFailure(error)
        }
    }
}

struct HARemove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "remove", abstract: "Stop HA-protecting a domain of this node.")

    @Argument(help: "The VM (the libvirt domain, without the agent's --domain-prefix).") var domain: String
    @OptionGroup var state: HAStateDirOption

    func validate() throws {
        try InputCheck.name(domain, "domain")
    }

    func run() throws {
        do {
            try HAAdmin.unprotect(domain: domain, stateDir: state.stateDir)
            print("\(domain) is no longer HA-protected")
        } catch {
            throw operatorFailure(error)
        }
    }
}

struct HAStatus: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "The cluster as this node's HA agent sees it.")

    @Flag(help: "Print JSON.") var json = false
    @OptionGroup var state: HAStateDirOption

    func run() throws {
        let s: HAStatusFile
        do { s = try HAStatusFile.read(stateDir: state.stateDir) } catch { throw operatorFailure(error) }
        if json {
            print(String(decoding: try s.encoded(), as: UTF8.self))
            return
        }
        print("node \(s.node) (id \(s.nodeID)): \(s.quorate ? "quorate" : "NOT QUORATE") for \(s.quorumChangedAgoMillis / 1000) s; coordinator \(s.coordinator ?? "none")")
        for m in s.members {
            let ram = m.ramTotalMiB.map { "\(m.ramFreeMiB ?? 0)/\($0) MiB free" } ?? "no report yet"
            let vms = m.vms.map { "\($0.name)(\($0.kind.rawValue), \($0.ramMiB) MiB\($0.state == .starting ? ", starting" : ""))" }
            print("  \(m.name)\(m.spare ? " [spare]" : ""): \(ram); \(vms.isEmpty ? "no VMs" : vms.joined(separator: " "))")
        }
        if let o = s.inboxOverflow, o != HAInbox.Overflow() {
            print("  the agent's inbox was full: \(o.scansSuperseded) scans superseded, \(o.producerWaits) inputs waited for room (is its loop stuck?)")
        }
        for e in s.recovery {
            let what: String
            switch e.phase {
            case .awaitingFence: what = "DOWN, waiting for a confirmed fence of \(e.mustFence.joined(separator: ", "))"
            case .recovery: what = "in recovery: no node fits yet (\(e.noFitAttempts) attempts)"
            case .assigned: what = "starting on \(e.assignedTo ?? "?")"
            }
            print("  recovering \(e.vm.name) (\(e.vm.ramMiB) MiB, from \(e.from)): \(what)")
        }
    }
}

struct NodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "node", abstract: "Cluster nodes for the HA path.",
                                                    subcommands: [NodeSpare.self])
}

enum OnOff: String, ExpressibleByArgument, CaseIterable { case on, off }

struct NodeSpare: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "spare", abstract: "Mark a node a reserved spare (N+1): it takes VMs only when no ordinary node can.")

    @Argument(help: "The node's name in corosync.conf.") var node: String
    @Argument(help: "on or off.") var state: OnOff
    @OptionGroup var dir: HAStateDirOption
    @Option(help: "How long to wait for the cluster to apply it.") var timeoutMillis = 5000

    func validate() throws {
        try InputCheck.millis(timeoutMillis, "--timeout-millis")
    }

    func run() throws {
        do {
            let want = state == .on
            try HAAdmin.setSpare(node: node, on: want, stateDir: dir.stateDir, timeoutMillis: timeoutMillis)
            print("node \(node) is \(want ? "a spare" : "an ordinary node") now")
        } catch {
            throw operatorFailure(error)
        }
    }
}

struct HAAgent: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the HA daemon of this node (beside Corosync, in the same network namespace).",
        discussion: """
        Joins Corosync's CPG group, publishes this node's HA and CA VMs and RAM, and when a node \
        fails: the coordinator (lowest-id member of the quorate partition) runs that node's fence \
        agent, and only after it confirms places the node's HA VMs on the survivors; the chosen \
        node defines and starts each through libvirt. A node that loses quorum stops its HA VMs.

        Fence configuration, one line per node (no shell quoting; exit 0 = confirmed off):
          n3 /usr/sbin/fence_ipmilan --ip=10.0.0.13 --username=admin --password-script=/etc/geminus/ipmi-pw --action=off
        """)

    @Option(help: "This node's name in corosync.conf (checked against Corosync's).") var node: String?
    @Option(help: "libvirt connection URI.") var uri = LibvirtConnection.defaultURI
    @Option(help: "Only domains whose names start with this belong to this node (several test 'nodes' on one libvirtd); the VM's name is the rest.") var domainPrefix = ""
    @Option(help: "RAM this node offers to VMs, in MiB (default: MemTotal).") var ramMib: Int?
    @Option(help: "Percent of a node's RAM that VMs may use beyond its free RAM.") var overcommitPercent = 0
    @Option(help: "The fence configuration file (see above).") var fenceConfig: String?
    @Option(help: "A fence agent running longer than this fails.") var fenceTimeoutMillis = 30_000
    @Option(help: "Wait after a failed fence before the next attempt.") var fenceRetryMillis = 5_000
    @Option(help: "Wait after a placement found no node before the next attempt.") var placementRetryMillis = 10_000
    @Option(help: "Without quorum for this long, this node stops its HA VMs (self-fence).") var selfFenceAfterMillis = 5_000
    @Option(help: "How often libvirt is scanned for this node's VMs.") var scanIntervalMillis = 500
    @Option(help: "The CPG group the agents meet in.") var group = "geminus-ha"
    @Option(help: "Stop after this many seconds (tests).") var durationSeconds: Double?
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"
    @OptionGroup var state: HAStateDirOption

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
        guard (0...1000).contains(overcommitPercent) else { throw ValidationError("--overcommit-percent must be 0...1000") }
        guard fenceTimeoutMillis >= 100 else { throw ValidationError("--fence-timeout-millis must be at least 100") }
        guard scanIntervalMillis >= 50 && scanIntervalMillis <= 60_000 else { throw ValidationError("--scan-interval-millis must be 50...60000") }
        guard fenceRetryMillis >= 100, placementRetryMillis >= 100, selfFenceAfterMillis >= 0 else { throw ValidationError("retry intervals must be at least 100 ms") }
        try InputCheck.millis(fenceTimeoutMillis, "--fence-timeout-millis", min: 100)
        try InputCheck.millis(fenceRetryMillis, "--fence-retry-millis", min: 100)
        try InputCheck.millis(placementRetryMillis, "--placement-retry-millis", min: 100)
        // 0 is meaningful here: stop HA VMs as soon as quorum is lost.
        try InputCheck.millis(selfFenceAfterMillis, "--self-fence-after-millis", min: 0)
        if let ramMib { try InputCheck.range(ramMib, "--ram-mib", 1...InputCheck.maxRAMMiB, unit: "MiB") }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { _ in HALogHandler(logLevel: level) }
        do {
            var config = HAConfig(overcommitPercent: overcommitPercent, fenceRetryMillis: UInt64(fenceRetryMillis),
                                  placementRetryMillis: UInt64(placementRetryMillis), selfFenceAfterMillis: UInt64(selfFenceAfterMillis))
            config.recoveryEntriesMax = 4096
            try HAAgentRunner.run(options: .init(
                uri: uri, domainPrefix: domainPrefix, ramMiB: ramMib, fenceConfig: fenceConfig, fenceTimeoutMillis: fenceTimeoutMillis,
                stateDir: state.stateDir, scanIntervalMillis: scanIntervalMillis, group: group, expectedNode: node),
                config: config, durationSeconds: durationSeconds)
        } catch {
            throw operatorFailure(error)
        }
    }
}
