import Foundation
import GeminusCore
import GeminusHA
import GeminusLibvirt

/// The operator's HA changes (`geminus ha add`, `ha remove`, `node spare`), checked against the
/// status this node's HA agent publishes: a change is refused outside a quorate partition, and
/// only a persistent domain without CA can be HA-protected.
public enum HAAdmin {
    /// HA-protects `domain` (without the agent's domain prefix) by metadata in its definition.
    public static func protect(domain: String, priority: Int, stateDir: String) throws {
        let s = try HAStatusFile.read(stateDir: stateDir)
        guard s.quorate else { throw noQuorum(s) }
        let conn = try LibvirtConnection.open(uri: s.uri)
        defer { try? conn.close() }
        let dom = try conn.lookupDomain(named: s.domainPrefix + domain)
        if try conn.readEnrollment(of: dom) != nil {
            throw GeminusError(.invalidArgument, "domain '\(domain)' is CA-protected (enrolled); the HA path is for VMs without CA",
                               fix: "`geminus unenroll \(domain)` first if it should be restarted instead of resumed")
        }
        guard try conn.isPersistent(dom) else {
            throw GeminusError(.invalidArgument, "domain '\(domain)' is transient: another node needs a persistent definition to start it from",
                               fix: "`virsh define` it (e.g. `virsh dumpxml \(s.domainPrefix)\(domain) > d.xml; virsh define d.xml`)")
        }
        try conn.writeHA(GeminusHAMetadata(priority: priority), of: dom)
    }

    /// Removes `domain`'s HA protection; refused when it has none.
    public static func unprotect(domain: String, stateDir: String) throws {
        let s = try HAStatusFile.read(stateDir: stateDir)
        let conn = try LibvirtConnection.open(uri: s.uri)
        defer { try? conn.close() }
        let dom = try conn.lookupDomain(named: s.domainPrefix + domain)
        guard try conn.readHA(of: dom) != nil else {
            throw GeminusError(.invalidArgument, "domain '\(domain)' is not HA-protected", fix: "`geminus ha status` lists the HA VMs")
        }
        try conn.removeHA(of: dom)
    }

    /// Asks the agents to make `node` a spare (or an ordinary node again) and waits until the
    /// published status shows it, at most `timeoutMillis`.
    public static func setSpare(node: String, on want: Bool, stateDir: String, timeoutMillis: Int) throws {
        let s = try HAStatusFile.read(stateDir: stateDir)
        guard s.members.contains(where: { $0.name == node }) else {
            throw GeminusError(.invalidArgument, "node '\(node)' is not in the cluster (members: \(s.members.map(\.name).joined(separator: ", ")))",
                               fix: "use a name from corosync.conf's nodelist, of a node whose HA agent runs")
        }
        guard s.quorate else { throw noQuorum(s) }
        try HARequest(spareNode: node, on: want).submit(stateDir: stateDir)
        let deadline = Monotonic.nanos() + UInt64(timeoutMillis) * 1_000_000
        while Monotonic.nanos() < deadline {
            if let now = try? HAStatusFile.read(stateDir: stateDir), now.members.first(where: { $0.name == node })?.spare == want {
                return
            }
            Monotonic.sleep(nanos: 100_000_000)
        }
        throw GeminusError(.timeout, "the HA agent did not apply `spare \(node) \(want ? "on" : "off")` within \(timeoutMillis) ms",
                           fix: "see the agent's log; is it quorate?")
    }

    static func noQuorum(_ s: HAStatusFile) -> GeminusError {
        GeminusError(.peerRefused, "no quorum: node \(s.node) is not in a quorate partition, so HA changes are refused",
                     fix: "check `corosync-quorumtool -s`; run the command on a node of the quorate partition")
    }
}
