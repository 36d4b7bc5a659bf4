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
        return try CorosyncArbitration.open(vm: vm, peerNodeID: peerNodeId, witnessNodeID: witnessNodeId, cpgGroup: cpgGroup, logger: logger, events: events)
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
    @Option(help: "The nodeids (corosync.conf) of the CA pairs' hosts, comma-separated: only their announcements are recorded (default: every node but this one).")
    var pairNodeIds: String?

    func validate() throws {
        _ = try pairNodes()
    }

    func pairNodes() throws -> Set<ClusterNodeID>? {
        guard let pairNodeIds else { return nil }
        let ids = pairNodeIds.split(separator: ",").map { UInt32($0.trimmingCharacters(in: .whitespaces)) }
        guard !ids.isEmpty, ids.allSatisfy({ $0 != nil }) else {
            throw ValidationError("--pair-node-ids '\(pairNodeIds)' is not a comma-separated list of corosync nodeids like 1,2")
        }
        return Set(ids.compactMap { $0 })
    }

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
            TotemCrypto.warnIfOff(logger: logger)
            let service = try WitnessService(cluster: cluster, statePath: state, logger: logger, pairNodes: try pairNodes())
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
