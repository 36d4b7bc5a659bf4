import CCorosync
import Foundation
import GeminusCluster
import GeminusCore
import GeminusReplication
import Logging

/// Arbitration by a three-node Corosync cluster (the pair and a witness host running
/// `geminus witness`): the timings come from this node's corosync.conf (docs/ARBITRATION.md).
public enum CorosyncArbitration {
    public static func open(vm: String, peerNodeID: UInt32, witnessNodeID: UInt32? = nil, cpgGroup: String, logger: Logger,
                            events: EventLog) throws -> (Arbitration, ClusterWitnessLink?) {
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
        TotemCrypto.warnIfOff(logger: logger)
        let cluster = try CorosyncCluster(groupName: cpgGroup)
        let link = ClusterWitnessLink(cluster: cluster, vm: vm, peer: peerNodeID, witness: witnessNodeID, logger: logger)
        logger.notice("arbitration by Corosync (token \(t.tokenMillis) ms, consensus \(t.consensusMillis) ms): a primary that loses quorum, or whose own messages go undelivered for \(timings.ringSilenceNanos / 1_000_000) ms, stops its guest within \(timings.selfFenceNanos / 1_000_000) ms; a secondary takes over \(timings.takeoverWaitNanos / 1_000_000) ms after winning")
        events.emit(.arbitration, ["engine": "corosync", "tokenMillis": t.tokenMillis, "consensusMillis": t.consensusMillis,
                                   "selfFenceMillis": timings.selfFenceNanos / 1_000_000, "takeoverWaitMillis": timings.takeoverWaitNanos / 1_000_000,
                                   "ringSilenceMillis": timings.ringSilenceNanos / 1_000_000])
        return (.witness(timings), link)
    }
}

/// Whether Corosync authenticates the ring's messages (totem crypto). The witness's records and
/// the agents' announcements travel in CPG messages; checking who sent one (ClusterWitnessLink,
/// WitnessService) means something only if nobody outside the cluster can send as a node, and
/// that is what `crypto_hash` (authentication) and `crypto_cipher` (secrecy) in corosync.conf's
/// totem section give.
public enum TotemCrypto {
    /// What the operator should hear, nil when both are on. `cipher`/`hash`: the cmap values,
    /// nil when not set (Corosync's default is none).
    public static func warning(cipher: String?, hash: String?) -> String? {
        let on = { (v: String?) in v.map { !$0.isEmpty && $0 != "none" } ?? false }
        let fix = "set crypto_cipher: aes256 and crypto_hash: sha256 in the totem section of corosync.conf on every node, with the same /etc/corosync/authkey (corosync-keygen), then restart Corosync (docs/ARBITRATION.md)"
        switch (on(cipher), on(hash)) {
        case (_, false):
            return "Corosync totem crypto is off (crypto_hash \(hash ?? "not set"), crypto_cipher \(cipher ?? "not set")): any host that can reach the ring's network can send arbitration messages as a cluster node and make a secondary resume while its primary runs; \(fix)"
        case (false, true):
            return "Corosync authenticates the ring (crypto_hash \(hash!)) but does not encrypt it (crypto_cipher \(cipher ?? "not set")): arbitration messages cannot be forged, but VM names and generations are readable on the network; \(fix)"
        case (true, true):
            return nil
        }
    }

    /// Reads the two cmap keys (nil values when not set); throws when cmap cannot be reached.
    public static func read(callTimeoutMillis: Int = 5000) throws -> (cipher: String?, hash: String?) {
        try BoundedCall.run("read corosync's totem crypto settings", timeoutMillis: callTimeoutMillis) {
            var cmap: cmap_handle_t = 0
            let rc = cmap_initialize(&cmap)
            guard rc == CS_OK else { throw GeminusError(.io, "cannot reach Corosync's cmap (error \(rc.rawValue))") }
            defer { cmap_finalize(cmap) }
            func string(_ key: String) -> String? {
                var s: UnsafeMutablePointer<CChar>?
                guard cmap_get_string(cmap, key, &s) == CS_OK, let s else { return nil }
                defer { free(s) }
                return String(cString: s)
            }
            return (string("totem.crypto_cipher"), string("totem.crypto_hash"))
        }
    }

    /// Logs, at start, how exposed the arbitration is; never stops the agent (a lab cluster
    /// may run without crypto on purpose, Tools/ca-partition-test does).
    public static func warnIfOff(logger: Logger) {
        do {
            let c = try read()
            if let w = warning(cipher: c.cipher, hash: c.hash) { logger.warning("\(w)") }
        } catch {
            logger.warning("could not check whether Corosync's totem crypto is on (\(error)); without crypto_hash in corosync.conf anyone on the ring's network can forge arbitration messages")
        }
    }
}
