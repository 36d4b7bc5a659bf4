import Foundation
import GeminusCluster
import GeminusCore
import GeminusReplication
import Logging

/// Arbitration by a three-node Corosync cluster (the pair and a witness host running
/// `geminus witness`): the timings come from this node's corosync.conf (docs/ARBITRATION.md).
public enum CorosyncArbitration {
    public static func open(vm: String, peerNodeID: UInt32, cpgGroup: String, logger: Logger, events: EventLog) throws -> (Arbitration, ClusterWitnessLink?) {
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
        let link = ClusterWitnessLink(cluster: cluster, vm: vm, peer: peerNodeID, logger: logger)
        logger.notice("arbitration by Corosync (token \(t.tokenMillis) ms, consensus \(t.consensusMillis) ms): a primary that loses quorum, or whose own messages go undelivered for \(timings.ringSilenceNanos / 1_000_000) ms, stops its guest within \(timings.selfFenceNanos / 1_000_000) ms; a secondary takes over \(timings.takeoverWaitNanos / 1_000_000) ms after winning")
        events.emit(.arbitration, ["engine": "corosync", "tokenMillis": t.tokenMillis, "consensusMillis": t.consensusMillis,
                                   "selfFenceMillis": timings.selfFenceNanos / 1_000_000, "takeoverWaitMillis": timings.takeoverWaitNanos / 1_000_000,
                                   "ringSilenceMillis": timings.ringSilenceNanos / 1_000_000])
        return (.witness(timings), link)
    }
}
