import Foundation
import Testing
import GeminusAgent
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

    @Test func announceIsRecordedDurablyAndAPartitionShowsInTheViews() throws {
        let nodes = [ClusterNode(id: 1, name: "h1"), ClusterNode(id: 2, name: "h2"), ClusterNode(id: 3, name: "w")]
        let cluster = SimulatedCluster(nodes: nodes)
        let logger = Logger(label: "test")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("geminus-witness-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let statePath = dir.appendingPathComponent("witness.json").path

        let stop = StopFlag()
        let witnessMember = cluster.join(nodes[2])
        let service = try WitnessService(cluster: witnessMember, statePath: statePath, logger: logger)
        let serviceThread = Thread { try? service.run(shouldStop: { stop.isSet }) }
        serviceThread.start()
        let primary = ClusterWitnessLink(cluster: cluster.join(nodes[0]), vm: "db", peer: 2, logger: logger)
        let secondary = ClusterWitnessLink(cluster: cluster.join(nodes[1]), vm: "db", peer: 1, logger: logger)
        defer { primary.stop(); secondary.stop(); stop.set() }

        Self.waitFor("both views quorate, peer present, witness heard") {
            [primary, secondary].allSatisfy { $0.current.map { $0.view.quorate && $0.view.peerPresent && $0.view.witnessHeard } ?? false }
        }
        #expect(primary.current?.view.record == nil)

        let record = WitnessRecord(generation: Generation(2), unprotectedAfter: Epoch(41))
        primary.announce(record)
        Self.waitFor("the record in both views") { [primary, secondary].allSatisfy { $0.current?.view.record == record } }
        let onDisk = try String(contentsOfFile: statePath, encoding: .utf8)
        #expect(onDisk.contains("\"db\"") && onDisk.contains("41"), "the record is on disk before it is published: \(onDisk)")

        cluster.isolate(nodes[1])
        Self.waitFor("the secondary alone: not quorate, peer absent") {
            secondary.current.map { !$0.view.quorate && !$0.view.peerPresent && !$0.view.witnessHeard } ?? false
        }
        Self.waitFor("the primary with the witness: quorate, peer absent, record heard again") {
            primary.current.map { $0.view.quorate && !$0.view.peerPresent && $0.view.witnessHeard && $0.view.record == record } ?? false
        }
        // An older announcement never replaces a newer record.
        primary.announce(WitnessRecord(generation: Generation(1), unprotectedAfter: Epoch(99)))
        Thread.sleep(forTimeInterval: 0.2)
        #expect(service.records["db"] == record)

        // A witness that restarts knows what it recorded.
        let elsewhere = SimulatedCluster(nodes: nodes)
        let restarted = try WitnessService(cluster: elsewhere.join(nodes[2]), statePath: statePath, logger: logger)
        #expect(restarted.records["db"] == record)
    }
}
