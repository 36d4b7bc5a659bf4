import Foundation
import Testing
@testable import GeminusAgent
import GeminusCluster
import GeminusCore
import GeminusReplication
import Logging

/// Review finding H2: arbitration messages are taken only from the nodes entitled to send them.
/// A witness publication counts only from the witness's node, an announcement or stop notice
/// only from a pair node; anything else is refused, counted and logged.
@Suite struct WitnessSenderTests {
    /// The review's reproduction: the primary's node publishes a witness message saying the
    /// VM's generation 1 stopped. Taken, it makes a quorate secondary resume at once while the
    /// primary runs.
    @Test func aWitnessMessageFromThePrimarysNodeIsNotTheWitness() throws {
        try ClusterWitnessTests.withWitness { w in
            let secondary = ClusterWitnessLink(cluster: w.cluster.join(w.nodes[1]), vm: "db", peer: 1, logger: w.logger)
            defer { secondary.stop() }
            let primaryNode = w.cluster.join(w.nodes[0])
            ClusterWitnessTests.waitFor("the secondary hears the witness, its peer present") {
                secondary.current.map { $0.view.quorate && $0.view.witnessHeard && $0.view.peerPresent } ?? false
            }
            try primaryNode.publish(Array(#"{"kind":"geminus-ca-witness","records":{},"stopped":{"db":1}}"#.utf8))
            ClusterWitnessTests.waitFor("the forgery refused") { secondary.refusedPublications == 1 }
            #expect(secondary.current?.view.stoppedGeneration == nil, "the secondary took the primary's node for the witness")
            // The real witness is still heard.
            try primaryNode.publish(WitnessMessage.agent(vm: "db", record: WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(3)), stopped: nil).encoded())
            ClusterWitnessTests.waitFor("the real record") { secondary.current?.view.record?.unprotectedAfter == Epoch(3) }
            #expect(secondary.refusedPublications == 1)
            withExtendedLifetime(primaryNode) {}
        }
    }

    /// With --witness-node-id, only that node; here a fourth node that is neither of the pair.
    @Test func aNamedWitnessIsTheOnlyOne() throws {
        let nodes = [ClusterNode(id: 1, name: "h1"), ClusterNode(id: 2, name: "h2"), ClusterNode(id: 3, name: "w"), ClusterNode(id: 4, name: "x")]
        let cluster = SimulatedCluster(nodes: nodes)
        let link = ClusterWitnessLink(cluster: cluster.join(nodes[1]), vm: "db", peer: 1, witness: 3, logger: Logger(label: "test"))
        defer { link.stop() }
        let other = cluster.join(nodes[3]), witness = cluster.join(nodes[2])
        Thread.sleep(forTimeInterval: 0.1)
        try other.publish(WitnessMessage.witness(records: [:], stopped: ["db": Generation(1)]).encoded())
        ClusterWitnessTests.waitFor("node 4 refused") { link.refusedPublications == 1 }
        try witness.publish(WitnessMessage.witness(records: [:], stopped: ["db": Generation(2)]).encoded())
        ClusterWitnessTests.waitFor("the witness heard") { link.current?.view.stoppedGeneration == Generation(2) }
        withExtendedLifetime([other, witness]) {}
    }

    /// With --pair-node-ids the witness records announcements only from those nodes. (Its
    /// default, every node but its own, cannot be shown here: the simulated cluster has one
    /// process per node.)
    @Test func theWitnessRecordsOnlyThePairsAnnouncements() throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let nodes = [ClusterNode(id: 1, name: "h1"), ClusterNode(id: 2, name: "h2"), ClusterNode(id: 3, name: "w"), ClusterNode(id: 4, name: "x")]
        let cluster = SimulatedCluster(nodes: nodes)
        let service = try WitnessService(cluster: cluster.join(nodes[2]), statePath: scratch.path("w.json"), logger: Logger(label: "test"),
                                         pairNodes: [1, 2])
        let stop = StopFlag()
        let thread = Thread { try? service.run(shouldStop: { stop.isSet }) }
        thread.start()
        defer { stop.set(); ClusterWitnessTests.keep(cluster, until: thread) }
        let outsider = cluster.join(nodes[3]), pairNode = cluster.join(nodes[0])
        try outsider.publish(WitnessMessage.agent(vm: "db", record: WitnessRecord(generation: Generation(9), unprotectedAfter: Epoch(1)), stopped: Generation(1)).encoded())
        try pairNode.publish(WitnessMessage.agent(vm: "web", record: nil, stopped: Generation(1)).encoded())
        ClusterWitnessTests.waitFor("the pair's notice recorded") { service.stopped["web"] == Generation(1) }
        #expect(service.stopped["db"] == nil && service.records["db"] == nil, "an outsider's notice was recorded")
        #expect(service.refusedAnnouncements == 1)
        withExtendedLifetime([outsider, pairNode]) {}
    }

    @Test func recordsWithGenerationsNoPairReachesAreMalformed() {
        #expect(WitnessMessage(decoding: Array(#"{"kind":"geminus-ca-witness","records":{},"stopped":{"db":18446744073709551615}}"#.utf8)) == nil)
        #expect(WitnessMessage(decoding: Array(#"{"kind":"geminus-ca-agent","vm":"db","record":{"generation":1,"after":18446744073709551615}}"#.utf8)) == nil)
        #expect(WitnessMessage(decoding: Array(#"{"kind":"geminus-ca-witness","records":{},"stopped":{"db":1}}"#.utf8)) != nil)
    }

    @Test func totemCryptoOffIsSaidWithTheFix() {
        #expect(TotemCrypto.warning(cipher: nil, hash: nil)?.contains("crypto_hash: sha256") == true)
        #expect(TotemCrypto.warning(cipher: "none", hash: "none")?.contains("send arbitration messages as a cluster node") == true)
        #expect(TotemCrypto.warning(cipher: "none", hash: "sha256")?.contains("does not encrypt") == true)
        #expect(TotemCrypto.warning(cipher: "aes256", hash: "sha256") == nil)
    }
}
