import Foundation
import Testing
@testable import GeminusAgent
import GeminusCluster
import GeminusCore
import GeminusReplication
import Logging

/// The witness link and the witness service over the cluster seam (SimulatedCluster: the same
/// seam CorosyncCluster implements): views, the announce/record round trip, a partition, and a
/// witness that restarts from its file.
@Suite struct ClusterWitnessTests {
    static func waitFor(_ what: String, seconds: Double = 5, _ condition: () -> Bool) {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if condition() { return }
            Thread.sleep(forTimeInterval: 0.01)
        }
        Issue.record("timed out waiting for \(what)")
    }

    /// Three nodes (h1, h2, the witness w) with `geminus witness`'s service running on w (its
    /// state in a scratch directory); torn down after `body`.
    struct Witness {
        let cluster: SimulatedCluster
        var nodes: [ClusterNode] { cluster.nodes }
        let service: WitnessService
        let statePath: String
        let logger = Logger(label: "test")
    }

    static func withWitness(_ body: (Witness) throws -> Void) throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let cluster = SimulatedCluster(nodes: [ClusterNode(id: 1, name: "h1"), ClusterNode(id: 2, name: "h2"), ClusterNode(id: 3, name: "w")])
        let statePath = scratch.path("witness.json")
        let service = try WitnessService(cluster: cluster.join(cluster.nodes[2]), statePath: statePath, logger: Logger(label: "test"))
        let stop = StopFlag()
        let serviceThread = Thread { try? service.run(shouldStop: { stop.isSet }) }
        serviceThread.start()
        defer { stop.set(); keep(cluster, until: serviceThread) }
        try body(Witness(cluster: cluster, service: service, statePath: statePath))
    }

    /// `withWitness`, and links for the pair's agents on h1 and h2 (the peers of each other).
    struct Pair {
        let witness: Witness
        let primary: ClusterWitnessLink
        let secondary: ClusterWitnessLink
        var cluster: SimulatedCluster { witness.cluster }
        var nodes: [ClusterNode] { witness.nodes }
        var service: WitnessService { witness.service }
    }

    static func withPair(_ body: (Pair) throws -> Void) throws {
        try withWitness { w in
            let pair = Pair(witness: w, primary: ClusterWitnessLink(cluster: w.cluster.join(w.nodes[0]), vm: "db", peer: 2, logger: w.logger),
                            secondary: ClusterWitnessLink(cluster: w.cluster.join(w.nodes[1]), vm: "db", peer: 1, logger: w.logger))
            defer { pair.primary.stop(); pair.secondary.stop() }
            try body(pair)
        }
    }

    /// The members hold the cluster unowned: it must outlive the service's thread.
    static func keep(_ cluster: SimulatedCluster, until thread: Thread) {
        withExtendedLifetime(cluster) {
            while !thread.isFinished { Thread.sleep(forTimeInterval: 0.01) }
            Thread.sleep(forTimeInterval: 0.15)  // the links' threads leave their loop within one poll
        }
    }

    @Test func announceIsRecordedDurablyAndAPartitionShowsInTheViews() throws {
        try Self.withPair { p in
            Self.waitFor("both views quorate, peer present, witness heard") {
                [p.primary, p.secondary].allSatisfy { $0.current.map { $0.view.quorate && $0.view.peerPresent && $0.view.witnessHeard } ?? false }
            }
            #expect(p.primary.current?.view.record == nil)

            let record = WitnessRecord(generation: Generation(2), unprotectedAfter: Epoch(41))
            p.primary.announce(record)
            Self.waitFor("the record in both views") { [p.primary, p.secondary].allSatisfy { $0.current?.view.record == record } }
            let onDisk = try String(contentsOfFile: p.witness.statePath, encoding: .utf8)
            #expect(onDisk.contains("\"db\"") && onDisk.contains("41"), "the record is on disk before it is published: \(onDisk)")

            p.cluster.isolate(p.nodes[1])
            Self.waitFor("the secondary alone: not quorate, peer absent") {
                p.secondary.current.map { !$0.view.quorate && !$0.view.peerPresent && !$0.view.witnessHeard } ?? false
            }
            Self.waitFor("the primary with the witness: quorate, peer absent, record heard again") {
                p.primary.current.map { $0.view.quorate && !$0.view.peerPresent && $0.view.witnessHeard && $0.view.record == record } ?? false
            }
            // An older announcement never replaces a newer record.
            p.primary.announce(WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(99)))
            Thread.sleep(forTimeInterval: 0.2)
            #expect(p.service.records["db"] == record)

            // A self-fenced primary says it stopped; the secondary, once back, hears it from the
            // witness (the other generation's record is untouched).
            p.primary.announceStopped(Generation(2))
            Self.waitFor("the stop recorded") { p.service.stopped["db"] == Generation(2) }
            #expect(p.service.records["db"] == record)
            p.cluster.reconnect(p.nodes[1])
            Self.waitFor("the stop in the secondary's view after the heal") {
                p.secondary.current.map { $0.view.quorate && $0.view.witnessHeard && $0.view.stoppedGeneration == Generation(2) } ?? false
            }

            // A witness that restarts knows what it recorded.
            let elsewhere = SimulatedCluster(nodes: p.nodes)
            let restarted = try WitnessService(cluster: elsewhere.join(p.nodes[2]), statePath: p.witness.statePath, logger: p.witness.logger)
            #expect(restarted.records["db"] == record)
            #expect(restarted.stopped["db"] == Generation(2))
        }
    }

    /// A primary cut off from everyone asks to run unprotected, is never answered (so it never
    /// released), and fences. Once the cut heals, the witness learns of the stop but not of the
    /// unanswered request: recorded late, it would forbid the secondary's checkpoint for nothing.
    @Test func aStopWithdrawsARequestTheWitnessNeverAnswered() throws {
        try Self.withPair { p in
            let answered = WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(10))
            p.primary.announce(answered)
            Self.waitFor("the first request answered") { p.primary.current?.view.record == answered }
            p.cluster.isolate(p.nodes[0])
            Self.waitFor("the primary alone") { p.primary.current.map { !$0.view.quorate } ?? false }
            p.primary.announce(WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(50)))
            p.primary.announceStopped(Generation(1))
            p.cluster.reconnect(p.nodes[0])
            Self.waitFor("the stop recorded after the heal") { p.service.stopped["db"] == Generation(1) }
            Thread.sleep(forTimeInterval: 0.1)
            #expect(p.service.records["db"] == answered, "the unanswered request (after epoch 50) must not be recorded")
        }
    }

    /// Corosync delivers what a node sent while its ring was broken once the ring heals: a
    /// request to run unprotected may reach the witness only after the primary fenced without an
    /// answer. Its stop notice, which states the record it ran under (none), withdraws it.
    @Test func aLateRequestIsWithdrawnByTheStopThatFollowsIt() throws {
        try Self.withWitness { w in
            let primary = w.cluster.join(w.nodes[0])  // the agent's messages, as Corosync delivers them
            let late = WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(50))
            try primary.publish(WitnessMessage.agent(vm: "db", record: late, stopped: nil).encoded())
            Self.waitFor("the late request recorded") { w.service.records["db"] == late }
            try primary.publish(WitnessMessage.agent(vm: "db", record: nil, stopped: Generation(1)).encoded())
            Self.waitFor("the stop recorded") { w.service.stopped["db"] == Generation(1) }
            #expect(w.service.records["db"] == nil, "withdrawn by the stop that states no record")
            // A stop of an older generation changes nothing about a newer generation's record.
            let newer = WitnessRecord(generation: Generation(2), unprotectedAfter: Epoch(7))
            try primary.publish(WitnessMessage.agent(vm: "db", record: newer, stopped: nil).encoded())
            Self.waitFor("the newer record") { w.service.records["db"] == newer }
            try primary.publish(WitnessMessage.agent(vm: "db", record: nil, stopped: Generation(1)).encoded())
            Thread.sleep(forTimeInterval: 0.1)
            #expect(w.service.records["db"] == newer)
        }
    }

    /// The pair together without the witness: the stopped primary's own word reaches its
    /// secondary, with the record it ran under (not its unanswered request).
    @Test func theStoppedPrimarysOwnWordReachesTheSecondaryWithoutTheWitness() throws {
        try Self.withPair { p in
            let answered = WitnessRecord(generation: Generation(4), unprotectedAfter: Epoch(10))
            p.primary.announce(answered)
            Self.waitFor("the request answered") { p.primary.current?.view.record == answered }
            p.cluster.isolate(p.nodes[2])
            Self.waitFor("the pair without the witness") {
                [p.primary, p.secondary].allSatisfy { $0.current.map { $0.view.quorate && !$0.view.witnessHeard } ?? false }
            }
            #expect(p.secondary.current?.view.stoppedGeneration == nil)
            p.primary.announce(WitnessRecord(generation: Generation(4), unprotectedAfter: Epoch(60)))
            p.primary.announceStopped(Generation(4))
            Self.waitFor("the stop, from the primary itself") { p.secondary.current?.view.stoppedGeneration == Generation(4) }
            #expect(p.secondary.current?.view.record == answered, "the record it ran under, not the unanswered request")
            #expect(p.service.stopped["db"] == nil, "the witness, cut off, knows nothing yet")
        }
    }

    /// A state file written before stop notices existed still loads (nothing stopped then).
    @Test func aStateFileWithoutStopsLoads() throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let path = scratch.path("witness.json")
        try #"{"kind":"geminus-ca-witness","records":{"db":{"after":41,"generation":2}}}"#.write(toFile: path, atomically: true, encoding: .utf8)
        let nodes = [ClusterNode(id: 3, name: "w")]
        let service = try WitnessService(cluster: SimulatedCluster(nodes: nodes).join(nodes[0]), statePath: path, logger: Logger(label: "test"))
        #expect(service.records["db"] == WitnessRecord(generation: Generation(2), unprotectedAfter: Epoch(41)))
        #expect(service.stopped.isEmpty)
    }
}
