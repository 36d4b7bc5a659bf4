import Foundation
import GeminusCluster
import GeminusCore
import Testing
@testable import GeminusHA

/// The cluster seam's simulated implementation and its bounded queue, which the scenario tests
/// (and issue 6's arbitration) stand on.
struct ClusterSeamTests {
    let nodes = (1...3).map { ClusterNode(id: ClusterNodeID($0), name: "n\($0)") }

    func drain(_ m: SimulatedClusterMember) -> [ClusterEvent] {
        var out: [ClusterEvent] = []
        while let e = try? m.nextEvent(timeoutMillis: 0) { out.append(e) }
        return out
    }

    @Test func majorityIsQuorateAndAnIsolatedNodeIsNot() throws {
        let c = SimulatedCluster(nodes: nodes)
        let members = nodes.map { c.join($0) }
        #expect(members.allSatisfy { $0.quorum.quorate })
        for m in members { _ = drain(m) }
        c.nowMillis = 1500
        c.isolate(nodes[0])
        let e1 = drain(members[0])
        #expect(e1.contains(.membership(ClusterMembership(members: [nodes[0]], joined: [nodes[0]],
                                                          left: [ClusterDeparture(node: nodes[1], reason: .nodeDown), ClusterDeparture(node: nodes[2], reason: .nodeDown)]))))
        #expect(e1.contains(.quorum(QuorumState(quorate: false, changedAtMillis: 1500, memberIDs: [1]))))
        let e2 = drain(members[1])
        #expect(e2.first == .membership(ClusterMembership(members: [nodes[1], nodes[2]], left: [ClusterDeparture(node: nodes[0], reason: .nodeDown)])))
        // Still quorate: the time of the last change stays; only the view changed.
        #expect(members[1].quorum == QuorumState(quorate: true, changedAtMillis: 0, memberIDs: [2, 3]))
    }

    @Test func publishedStatesReachThePartitionInOneOrder() throws {
        let c = SimulatedCluster(nodes: nodes)
        let members = nodes.map { c.join($0) }
        for m in members { _ = drain(m) }
        try members[2].publish([3])
        try members[0].publish([1])
        for m in members {
            #expect(drain(m) == [.published(from: nodes[2], state: [3]), .published(from: nodes[0], state: [1])])
        }
        c.fail(nodes[1])
        #expect(throws: GeminusError.self) { try members[1].publish([2]) }
    }

    @Test func queueKeepsTheLatestStatePerNodeAndMergesChangesWhenFull() throws {
        let q = ClusterEventQueue(limit: 4)
        for i in 0..<100 { q.push(.published(from: nodes[0], state: [UInt8(i)])) }
        #expect(q.count == 1)
        #expect(try q.pop(timeoutMillis: 0) == .published(from: nodes[0], state: [99]))
        q.push(.published(from: nodes[0], state: [1]))
        q.push(.published(from: nodes[1], state: [2]))
        q.push(.membership(ClusterMembership(members: nodes, joined: [nodes[2]])))
        q.push(.quorum(QuorumState(quorate: true, changedAtMillis: 1)))
        // Full: the next membership change merges into the queued one, nothing is lost.
        q.push(.membership(ClusterMembership(members: [nodes[0], nodes[1]], left: [ClusterDeparture(node: nodes[2], reason: .nodeDown)])))
        #expect(q.count == 4)
        var events: [ClusterEvent] = []
        while let e = try q.pop(timeoutMillis: 0) { events.append(e) }
        #expect(events.last == .membership(ClusterMembership(members: [nodes[0], nodes[1]], joined: [nodes[2]],
                                                             left: [ClusterDeparture(node: nodes[2], reason: .unknown)])))
        #expect(q.stats.coalescedEvents == 100)
        q.fail(GeminusError(.connectionFailed, "gone"))
        #expect(throws: GeminusError.self) { try q.pop(timeoutMillis: 10) }
    }

    @Test func reportsSurviveTheWireAndRefuseOtherVersions() throws {
        var r = NodeReport(ramTotalMiB: 8192, ramFreeMiB: 4096, vms: [VMReport(name: "web1", ramMiB: 2048, priority: 3, definition: "<domain/>")])
        r.failedStarts = ["db1": "no"]
        #expect(try NodeReport.decode(r.encoded()) == r)
        #expect(throws: GeminusError.self) { try NodeReport.decode(Array(#"{"v":2,"report":{}}"#.utf8)) }
        #expect(throws: GeminusError.self) { try NodeReport.decode([1, 2, 3]) }
    }

    /// A node that starts before its cluster formed must not stop the VMs its host runs.
    @Test func noSelfFenceBeforeTheNodeWasEverQuorate() {
        var m = HAManager(node: nodes[0])
        _ = m.handle(.localScan(vms: [VMReport(name: "web1", ramMiB: 1024)], ramTotalMiB: 4096, ramFreeMiB: 3072), nowMillis: 0)
        let a = m.handle(.membership(ClusterMembership(members: [nodes[0]], joined: [nodes[0]])), nowMillis: 0)
        let later = m.handle(.tick, nowMillis: 60_000)
        #expect(!(a + later).contains { if case .stop = $0 { return true }; return false })
    }

    /// After a join the coordinator waits for every member's fresh state, but not forever.
    @Test func aSilentMemberDoesNotStallTheCoordinator() {
        var m = HAManager(node: nodes[0])
        _ = m.handle(.membership(ClusterMembership(members: [nodes[0], nodes[1]], joined: [nodes[0], nodes[1]])), nowMillis: 0)
        _ = m.handle(.quorum(QuorumState(quorate: true, changedAtMillis: 0, memberIDs: [1, 2])), nowMillis: 0)
        let warning = HAAction.log(.warning, "no fresh state from n2 within 3000 ms of the join; continuing without it")
        #expect(!m.handle(.tick, nowMillis: 2_999).contains(warning))
        #expect(m.handle(.tick, nowMillis: 3_000).contains(warning))
    }
}
