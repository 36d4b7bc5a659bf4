import Testing
import Glibc
@testable import GeminusCore
@testable import GeminusHypervisor

@Suite struct SimulatedGuestTests {
    @Test func sameSeedSameGuestByteForByte() throws {
        let w = SimulatedWorkload(ramMiB: 1, dirtyPagesPerSecond: 1000, outputsPerSecond: 100, seed: 42)
        let a = try SimulatedGuest(workload: w, memory: PageMemory(pageCount: w.pageCount))
        let b = try SimulatedGuest(workload: w, memory: PageMemory(pageCount: w.pageCount))
        for _ in 0..<5000 { a.step(); b.step(); _ = a.flushOutput(to: DiscardPort()); _ = b.flushOutput(to: DiscardPort()) }
        #expect(a.memory.contentsEqual(b.memory))
        #expect(a.counter == 5000)
        #expect(a.outputSequence == 500)
    }

    /// A guest resumed from a checkpoint continues exactly as the original would have: the
    /// property failover relies on for "the resumed VM reproduces every released output".
    @Test func resumedGuestContinuesTheSameHistory() throws {
        let w = SimulatedWorkload(ramMiB: 1, dirtyPagesPerSecond: 1000, outputsPerSecond: 50, seed: 3)
        let original = try SimulatedGuest(workload: w, memory: PageMemory(pageCount: w.pageCount))
        for _ in 0..<777 { original.step(); _ = original.flushOutput(to: DiscardPort()) }
        let buffer = CheckpointBuffer(limitPages: w.pageCount)
        try original.capture(full: true, into: buffer)
        let copy = try PageMemory(pageCount: w.pageCount)
        for i in 0..<buffer.pageCount { copy.page(buffer.pageIndices[i]).copyMemory(from: buffer.contents(at: i), byteCount: 4096) }
        let resumed = try SimulatedGuest(memory: copy, deviceState: buffer.deviceState)
        let recorder = RecordingPort()
        let recorder2 = RecordingPort()
        for _ in 0..<1000 {
            original.step(); _ = original.flushOutput(to: recorder)
            resumed.step(); _ = resumed.flushOutput(to: recorder2)
        }
        #expect(original.memory.contentsEqual(resumed.memory))
        #expect(recorder.packets == recorder2.packets)
        #expect(!recorder.packets.isEmpty)
    }

    /// With frames and a disk: even outputs leave as NIC frames, the disk is written, a delta
    /// carries the blocks written since the last capture, and a guest resumed from a full
    /// capture (memory, device state, disk) continues exactly as the original.
    @Test func framesAndDiskSurviveAResume() throws {
        var w = SimulatedWorkload(ramMiB: 1, dirtyPagesPerSecond: 1000, outputsPerSecond: 100, seed: 9)
        w.nicFrames = true
        w.diskBlocks = 16
        w.diskWriteEverySteps = 7
        let original = try SimulatedGuest(workload: w, memory: PageMemory(pageCount: w.pageCount))
        let port = KindPort()
        for _ in 0..<500 { original.step(); _ = original.flushOutput(to: port) }
        #expect(port.frames.count == 25 && port.lines.count == 25)
        #expect(port.frames.allSatisfy { f in SimulatedNICFrame.unwrap(f, seed: 9).flatMap { OutputPacket(decoding: $0) }.map { $0.sequence % 2 == 0 } ?? false })
        #expect(original.diskInconsistency() == nil)
        let buffer = CheckpointBuffer(limitPages: w.pageCount)
        try original.capture(full: true, into: buffer)
        #expect(buffer.diskSizeBytes == 16 * 4096 && !buffer.diskWrites.isEmpty)
        var disk = [UInt8](repeating: 0, count: 16 * 4096)
        for d in buffer.diskWrites { disk.replaceSubrange(Int(d.offset)..<Int(d.offset) + d.data.count, with: d.data) }
        #expect(disk == original.disk)
        let copy = try PageMemory(pageCount: w.pageCount)
        for i in 0..<buffer.pageCount { copy.page(buffer.pageIndices[i]).copyMemory(from: buffer.contents(at: i), byteCount: 4096) }
        #expect(throws: GeminusError.self) { try SimulatedGuest(memory: copy, deviceState: buffer.deviceState) }
        let resumed = try SimulatedGuest(memory: copy, deviceState: buffer.deviceState, disk: disk)
        for _ in 0..<70 { original.step(); resumed.step() }
        try original.capture(full: false, into: buffer)
        #expect(buffer.diskWrites.count >= 1 && buffer.diskWrites.count <= 10)
        #expect(original.memory.contentsEqual(resumed.memory) && original.disk == resumed.disk)
        // A block that lost its last write is seen from memory.
        let block = Int(resumed.memory.loadU64(at: SimulatedGuest.lastDiskBlockAddress))
        var lost = resumed.disk
        for i in block * 4096..<(block + 1) * 4096 { lost[i] = 0 }
        let broken = try SimulatedGuest(memory: resumed.memory, deviceState: buffer.deviceState, disk: lost)
        #expect(broken.diskInconsistency() != nil)
    }

    @Test func captureReturnsExactlyTheWrittenPages() throws {
        let w = SimulatedWorkload(ramMiB: 2, dirtyPagesPerSecond: 1000, outputsPerSecond: 0, seed: 5)
        let g = try SimulatedGuest(workload: w, memory: PageMemory(pageCount: w.pageCount))
        let buffer = CheckpointBuffer(limitPages: w.pageCount)
        try g.capture(full: false, into: buffer)
        #expect(buffer.pageCount == w.pageCount) // boot wrote everything
        let shadow = try PageMemory(pageCount: w.pageCount)
        shadow.base.copyMemory(from: g.memory.base, byteCount: g.memory.byteCount)
        for _ in 0..<300 { g.step() }
        try g.capture(full: false, into: buffer)
        var changed: Set<Int> = []
        for p in 0..<w.pageCount where memcmp(shadow.page(p), g.memory.page(p), 4096) != 0 { changed.insert(p) }
        let captured = Set(buffer.pageIndices)
        #expect(captured.isSuperset(of: changed))
        #expect(captured.count <= 301)
    }

    @Test func badWorkloadsAreRefusedWithTheReason() {
        #expect(throws: GeminusError.self) { try SimulatedWorkload(ramMiB: 0).validate() }
        #expect(throws: GeminusError.self) { try SimulatedWorkload(hotFraction: 0).validate() }
        #expect(throws: GeminusError.self) { try SimulatedWorkload(dirtyPagesPerSecond: 10, outputsPerSecond: 20).validate() }
    }
}

final class RecordingPort: GuestOutputPort, @unchecked Sendable {
    var packets: [[UInt8]] = []
    func offer(_ packet: [UInt8]) -> Bool { packets.append(packet); return true }
}

@Suite struct FileBackedMemoryTests {
    @Test func twoMappingsOfOneFileSeeEachOthersWrites() throws {
        let path = "/dev/shm/geminus-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(path) }
        let a = try PageMemory(fileAt: path, pageCount: 4, create: true)
        let b = try PageMemory(fileAt: path, pageCount: 4, create: false)
        a.storeU64(0xFEED, at: 4096 + 8)
        #expect(b.loadU64(at: 4096 + 8) == 0xFEED)
        #expect(throws: GeminusError.self) { try PageMemory(fileAt: path, pageCount: 8, create: false) }
        #expect(throws: GeminusError.self) { try PageMemory(fileAt: "/nonexistent/dir/x", pageCount: 1, create: true) }
    }
}

/// Records console lines and NIC frames apart.
final class KindPort: GuestOutputPort, @unchecked Sendable {
    var lines: [[UInt8]] = []
    var frames: [[UInt8]] = []
    func offer(_ packet: [UInt8]) -> Bool { lines.append(packet); return true }
    func offerFrame(_ frame: [UInt8]) -> Bool { frames.append(frame); return true }
}
