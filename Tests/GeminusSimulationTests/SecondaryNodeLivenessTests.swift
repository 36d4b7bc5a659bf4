import Testing
import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication

/// The real `SecondaryNode` over hand-driven seams, fed epochs a simulated guest captured:
/// what the secondary says when its primary restarted (H1) or its replica disk failed (M5).
@Suite struct SecondaryNodeLivenessTests {
    static let ms: UInt64 = 1_000_000

    final class Clock: NodeClock, @unchecked Sendable { var nowNanos: UInt64 = 0 }

    final class Link: PeerLink {
        var inbox: [Frame] = []
        var sent: [Frame] = []
        var closed = false
        var remoteAddress: String { "test-primary" }
        var peerHoldsCheckpoint: Bool { false }
        var lastHeardNanos: UInt64 = 0

        func send(_ frame: [UInt8]) throws(GeminusError) {
            var d = FrameDecoder()
            d.feed(frame)
            sent.append(try! d.next()!)
        }

        func receive() -> LinkInput {
            if closed { return .broken(reason: "closed", corruptEpoch: nil) }
            return inbox.isEmpty ? .idle : .frame(inbox.removeFirst())
        }

        func waitForInput(maxNanos: UInt64) {}
        func flush(maxNanos: UInt64) {}
        func close() { closed = true }
    }

    final class Acceptor: PeerAcceptor {
        var pending: (link: any PeerLink, peer: AdmissionRequest)?
        func take() -> (link: any PeerLink, peer: AdmissionRequest)? {
            defer { pending = nil }
            return pending
        }
        func stop() {}
    }

    final class Events: NodeEventSink {
        var all: [NodeEvent] = []
        func record(_ event: NodeEvent) { all.append(event) }
        var cannotTakeOver: [String] { all.compactMap { if case .cannotTakeOver(_, let r) = $0 { return r } else { return nil } } }
    }

    /// A replica disk whose next commit fails (hung or failing storage), before it writes anything.
    final class FailingDisk: ReplicaDisk {
        let sizeBytes: UInt64
        var failNextCommit = false
        var bytes: [UInt8]
        init(sizeBytes: UInt64) {
            self.sizeBytes = sizeBytes
            bytes = Array(repeating: 0, count: Int(sizeBytes))
        }
        func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
            bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
        }
        func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
            bytes.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
        }
        func zeroAll() throws(GeminusError) { bytes = Array(repeating: 0, count: Int(sizeBytes)) }
        func sync() throws(GeminusError) {}
        func commit(_ epoch: DiskCommit) throws(GeminusError) {
            if failNextCommit {
                failNextCommit = false
                throw GeminusError(.io, "pwrite: Input/output error")
            }
            try applyInOrder(epoch)
        }
    }

    struct Standby: StandbyHost, @unchecked Sendable {
        let disk: FailingDisk?
        func makeReplicaMemory(pageCount: Int) throws(GeminusError) -> PageMemory { try PageMemory(pageCount: pageCount) }
        func makeReplicaDisk() throws(GeminusError) -> (any ReplicaDisk)? { disk }
        func resume(memory: PageMemory, deviceState: [UInt8], output: any GuestOutputPort) throws(GeminusError) -> any ProtectedGuest {
            throw GeminusError(.hypervisor, "this test's standby never resumes")
        }
    }

    final class NoOutput: OutputDestination, @unchecked Sendable {
        func deliver(_ items: [GuestOutputItem], releasedThrough: Epoch?, generation: Generation) {}
    }

    /// A pair's secondary with one primary connected, and a guest whose epochs it is fed.
    struct Pair {
        let clock = Clock()
        let link = Link()
        let events = Events()
        let node: SecondaryNode
        let guest: SimulatedGuest
        let encoder: CheckpointEncoder
        let buffer: CheckpointBuffer

        init(diskBlocks: Int = 0, disk: FailingDisk? = nil) throws {
            var workload = SimulatedWorkload(ramMiB: 1, seed: 5)
            workload.diskBlocks = diskBlocks
            guest = try SimulatedGuest(workload: workload, memory: PageMemory(pageCount: workload.pageCount))
            encoder = try CheckpointEncoder(pageCount: workload.pageCount)
            buffer = CheckpointBuffer(limitPages: workload.pageCount)
            let acceptor = Acceptor()
            node = SecondaryNode(settings: .init(vmName: "vm", machine: .init(takeoverAfterNanos: 150 * SecondaryNodeLivenessTests.ms)),
                                 standby: Standby(disk: disk), clock: clock, acceptor: acceptor, events: events,
                                 makePort: { g, e in HeldOutputPort(limitBytes: 1 << 20, destination: NoOutput(), generation: g, openEpoch: e) })
            acceptor.pending = (link, AdmissionRequest(isPrimary: true, vmName: "vm", generation: Generation(1),
                                                       guestPageCount: UInt64(workload.pageCount), platform: GuestPlatform()))
            node.step()
        }

        /// The guest runs a little, then epoch `epoch` is captured on `base` and delivered.
        func feed(_ epoch: Epoch, full: Bool, base: Epoch) throws {
            for _ in 0..<200 { _ = guest.step() }
            try guest.capture(full: full, into: buffer)
            var frames: [Frame] = []
            _ = try encoder.encode(buffer, epoch: epoch, generation: Generation(1), baseEpoch: base) { bytes in
                var d = FrameDecoder()
                d.feed(bytes)
                frames.append(try d.next()!)
            }
            link.inbox += frames
            clock.nowNanos += SecondaryNodeLivenessTests.ms
            link.lastHeardNanos = clock.nowNanos
            node.step()
        }
    }

    /// H1, the unit variant: a replica that committed 1..10 is fed a full epoch 1 at the same
    /// generation (the primary's agent restarted and numbers from 1 again). Before, the replica
    /// ignored it as stale and nothing was sent: the restarted primary waited for an ack for
    /// good. Now a nack of reason stale names epoch 10, which the primary numbers on from.
    @Test func aFullEpochAtOrBelowTheCommittedOneIsNackedWithTheEpochHeld() throws {
        let p = try Pair()
        try p.feed(Epoch(1), full: true, base: .none)
        for e in 2...10 { try p.feed(Epoch(UInt64(e)), full: false, base: Epoch(UInt64(e - 1))) }
        #expect(p.node.replica?.committedEpoch == Epoch(10))
        p.link.sent.removeAll()

        try p.feed(Epoch(1), full: true, base: .none)
        let nacks = p.link.sent.filter { $0.kind == .nack }
        #expect(nacks.count == 1, "sent: \(p.link.sent.map { "\($0.kind) \($0.epoch)" })")
        #expect(nacks.first?.epoch == Epoch(10))
        #expect(nacks.first.flatMap { Nack(decoding: $0.payload) }?.reason == .stale)
        #expect(p.node.replica?.committedEpoch == Epoch(10), "the checkpoint held is kept")
    }

    /// M5: the replica disk fails at the commit of a delta, then the primary goes silent. Before,
    /// the machine took over, the node found no resumable replica, and the status said
    /// "took-over" with no guest. Now: a cannot-take-over event with the reason, and no takeover.
    @Test func aReplicaDiskFailureThenPrimaryLossSaysCannotTakeOver() throws {
        let disk = FailingDisk(sizeBytes: UInt64(16 * SimulatedGuest.diskBlockSize))
        let p = try Pair(diskBlocks: 16, disk: disk)
        try p.feed(Epoch(1), full: true, base: .none)
        try p.feed(Epoch(2), full: false, base: Epoch(1))
        disk.failNextCommit = true
        try p.feed(Epoch(3), full: false, base: Epoch(2))
        #expect(p.link.sent.contains { $0.kind == .nack && $0.epoch == Epoch(3) })
        #expect(p.node.replica?.isResumable == false)

        // The primary goes silent (it died before the full checkpoint the nack asked for).
        for _ in 0..<50 {
            p.clock.nowNanos += 10 * Self.ms
            p.node.step()
        }
        #expect(p.node.takeover == nil)
        #expect(p.node.stateName != "took-over")
        #expect(p.events.cannotTakeOver.count == 1, "events: \(p.events.all.map(\.message))")
        #expect(p.events.cannotTakeOver.first?.contains("writing the replica disk failed at epoch 3") == true)
        #expect(p.events.cannotTakeOver.first?.contains("Input/output error") == true)
    }
}

extension SecondaryNodeLivenessTests {
    /// M3: a standby that is DOWN. Before, the secondary went on acknowledging (the health watch
    /// only fed `geminus status`) and the primary said PROTECTED. Now the node drops the primary,
    /// says why, and its admission refuses dials until the standby answers again.
    @Test func aDownStandbyDropsThePrimaryAndRefusesItsDials() throws {
        let p = try Pair()
        try p.feed(Epoch(1), full: true, base: .none)
        let request = AdmissionRequest(isPrimary: true, vmName: "vm", generation: Generation(1), guestPageCount: 256, platform: GuestPlatform())
        func refusal() -> String? {
            SecondaryAdmission.refusal(of: request, vmName: "vm", expectedPageCount: nil, platform: GuestPlatform(), state: p.node.admission.state)
        }
        #expect(refusal() == nil)

        p.node.standbyHealth.down = "DOWN (the standby QEMU does not answer)"
        p.clock.nowNanos += Self.ms
        p.node.step()
        #expect(p.link.closed)
        #expect(p.events.all.contains { if case .standbyDown = $0 { return true } else { return false } })
        #expect(refusal()?.contains("standby reports DOWN") == true)
        // Its own silence afterwards takes nothing over, and says nothing more.
        for _ in 0..<50 {
            p.clock.nowNanos += 10 * Self.ms
            p.node.step()
        }
        #expect(p.node.takeover == nil)
        #expect(p.events.cannotTakeOver.isEmpty)

        p.node.standbyHealth.down = nil
        p.node.step()
        #expect(refusal() == nil)
        #expect(p.events.all.contains { if case .standbyBack = $0 { return true } else { return false } })
    }
}
