import ArgumentParser
import Foundation
import GeminusAgent
import GeminusCluster
import GeminusCore
import GeminusReplication
import Logging

/// How an agent decides who may run the VM (see docs/ARBITRATION.md).
enum ArbitrationChoice: String, ExpressibleByArgument, CaseIterable {
    /// No arbitration: a partition between two live hosts runs the VM twice. One host, tests.
    case none
    /// A three-node Corosync cluster (the two hosts and a witness host running `geminus witness`).
    case corosync
}

extension Agent {
    /// The witness link and the timings derived from this Corosync, or nil without arbitration.
    func openArbitration(logger: Logger, events: EventLog) throws -> (Arbitration, ClusterWitnessLink?) {
        guard arbitration == .corosync else {
            logger.warning("no arbitration (--arbitration none): a partition between two live hosts can run \(vm) twice. Protect production VMs with --arbitration corosync")
            return (.none, nil)
        }
        guard let peerNodeId else { preconditionFailure("validate() requires --peer-node-id with --arbitration corosync") }
        let t: (tokenMillis: UInt64, consensusMillis: UInt64, knetPingTimeoutMillis: UInt64?)
        do { t = try CorosyncCluster.totemSettings() } catch let error as GeminusError {
            // The default needs Corosync: say how to run without it, and what that costs.
            var e = error
            e.fix = (e.fix.map { $0 + "; " } ?? "") + "or, on one host or in tests only, run the agents with --arbitration none (a partition between two live hosts can then run the VM twice)"
            throw e
        }
        let timings = ArbitrationTimings.corosync(tokenMillis: t.tokenMillis, consensusMillis: t.consensusMillis)
        // Measured here: at token 300 and 400 with knet's default ping timeout (token / 2) the
        // survivors of a node loss flapped their link every few seconds, fencing the new primary.
        let ping = t.knetPingTimeoutMillis ?? t.tokenMillis / 2
        if ping < 250 {
            logger.warning("corosync's knet ping timeout is \(ping) ms\(t.knetPingTimeoutMillis == nil ? " (token / 2, not set)" : ""): with a short token the two survivors of a node loss can flap their link and lose quorum. Set knet_ping_interval: 100 and knet_ping_timeout: 1000 in corosync.conf's totem.interface (linknumber 0); it changes none of the arbitration bounds (docs/ARBITRATION.md)")
        }
        let cluster = try CorosyncCluster(groupName: cpgGroup)
        let link = ClusterWitnessLink(cluster: cluster, vm: vm, peer: peerNodeId, logger: logger)
        logger.notice("arbitration by Corosync (token \(t.tokenMillis) ms, consensus \(t.consensusMillis) ms): a primary that loses quorum, or whose own messages go undelivered for \(timings.ringSilenceNanos / 1_000_000) ms, stops its guest within \(timings.selfFenceNanos / 1_000_000) ms; a secondary takes over \(timings.takeoverWaitNanos / 1_000_000) ms after winning")
        events.emit(.arbitration, ["engine": "corosync", "tokenMillis": t.tokenMillis, "consensusMillis": t.consensusMillis,
                                    "selfFenceMillis": timings.selfFenceNanos / 1_000_000, "takeoverWaitMillis": timings.takeoverWaitNanos / 1_000_000,
                                    "ringSilenceMillis": timings.ringSilenceNanos / 1_000_000])
        return (.witness(timings), link)
    }
}

struct Witness: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the CA pairs' witness on the third Corosync node (docs/ARBITRATION.md).",
        discussion: """
        Keeps, per VM, the newest "generation G ran unprotected after epoch E" a primary \
        announced, on disk (fsynced before it is published) and in the cluster, so that a \
        secondary never resumes a checkpoint that is behind output its primary released alone. \
        Its node's vote is what lets one host of a pair stay quorate when the other is lost.
        """)

    @Option(help: "Where the records are kept.") var state = "/var/lib/geminus/witness.json"
    @Option(help: "The CPG group the CA agents use.") var cpgGroup = "geminus-ca"
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"

    func run() throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "geminus.witness")
        do {
            try FileManager.default.createDirectory(atPath: (state as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            let cluster = try CorosyncCluster(groupName: cpgGroup)
            let service = try WitnessService(cluster: cluster, statePath: state, logger: logger)
            logger.notice("witness for group \(cpgGroup) on node \(cluster.localNode), \(service.records.count) records from \(state)")
            let stopper = StopOnSignal()
            let stop = StopFlag()
            stopper.onSignal { stop.set() }
            try service.run(shouldStop: { stop.isSet })
            cluster.close()
        } catch {
            throw operatorFailure(error)
        }
    }
}
