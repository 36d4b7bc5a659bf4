import Foundation
import Testing
@testable import GeminusCore

/// A FileReplicaDisk on real files: an epoch is applied through its journal, so a crash at any
/// point leaves an image that is one committed epoch, never a mix (checked byte for byte).
@Suite struct ReplicaDiskDurabilityTests {
    static let size = 1 << 20

    static func block(_ seed: UInt8, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: Int(seed) &* 57 &+ $0 &* 7 &+ 1) } }


    /// Epoch 1 (full) and epoch 2 (a delta whose writes overlap: data, a zero over part of it,
    /// data again inside the hole), and the images each leaves.
    struct Epochs {
        typealias T = ReplicaDiskDurabilityTests
        let first: [DiskWrite] = [DiskWrite(offset: 0, data: T.block(1, 300_000)), DiskWrite(offset: 500_000, data: T.block(2, 100_000)),
                                  .zeroes(offset: 50_000, length: 10_000)]
        let second: [DiskWrite] = [DiskWrite(offset: 10_000, data: T.block(3, 70_000)), .zeroes(offset: 40_000, length: 520_000),
                                   DiskWrite(offset: 45_000, data: T.block(4, 5000)), DiskWrite(offset: 1_000_000, data: T.block(5, 48_576)),
                                   .zeroes(offset: 0, length: 100)]
        var imageAfterFirst: [UInt8] { DiskWrite.applied(first, to: [UInt8](repeating: 0, count: T.size), replacing: true) }
        var imageAfterSecond: [UInt8] { DiskWrite.applied(second, to: imageAfterFirst) }
    }

    func openDisk(_ dir: TempDir) throws -> FileReplicaDisk {
        try FileReplicaDisk(path: dir.path + "/replica.img", sizeBytes: UInt64(Self.size))
    }

    /// A disk holding epoch 1, committed.
    func diskAtFirstEpoch(_ dir: TempDir) throws -> FileReplicaDisk {
        let disk = try openDisk(dir)
        try disk.commit(DiskCommit(epoch: Epoch(1), writes: Epochs().first, replacesDisk: true, isLive: false))
        #expect(try dir.read("replica.img") == Epochs().imageAfterFirst)
        #expect(try dir.size("replica.img.geminus-journal") == 0, "the journal is cleared after a commit")
        return disk
    }

    @Test(arguments: [0, 1, 3, 4])
    func aCrashAfterTheJournalIsDurableReplaysTheEpochWhole(crashAfter: Int) throws {
        let dir = try TempDir()
        let epochs = Epochs()
        do {
            let disk = try diskAtFirstEpoch(dir)
            disk.crashAfterRecordWrites = crashAfter
            #expect(throws: GeminusError.self) {
                try disk.commit(DiskCommit(epoch: Epoch(2), writes: epochs.second, replacesDisk: false, isLive: false))
            }
            let torn = try dir.read("replica.img")
            #expect(torn != epochs.imageAfterSecond, "the crash should have stopped the apply part-way")
            #expect(crashAfter > 0 || torn == epochs.imageAfterFirst, "nothing may be applied before the journal")
            #expect(try dir.size("replica.img.geminus-journal") > 0)
        }
        // The process is gone; the disk is opened again.
        let reopened = try openDisk(dir)
        #expect(reopened.lastRecovery == .replayed(Epoch(2)))
        #expect(try dir.read("replica.img") == epochs.imageAfterSecond)
        #expect(try dir.size("replica.img.geminus-journal") == 0)
    }

    @Test func aCrashDuringReplayIsMendedByReplayingAgainAndReplayIsIdempotent() throws {
        let dir = try TempDir()
        let epochs = Epochs()
        let disk = try diskAtFirstEpoch(dir)
        disk.crashAfterRecordWrites = 2
        #expect(throws: GeminusError.self) { try disk.commit(DiskCommit(epoch: Epoch(2), writes: epochs.second, replacesDisk: false, isLive: false)) }
        let journal = try dir.read("replica.img.geminus-journal")
        // Recovery itself interrupted part-way.
        disk.crashAfterRecordWrites = 3
        #expect(throws: GeminusError.self) { try disk.recover() }
        disk.crashAfterRecordWrites = nil
        #expect(try disk.recover() == .replayed(Epoch(2)))
        #expect(try dir.read("replica.img") == epochs.imageAfterSecond)
        // The same journal again, onto the finished image: nothing changes.
        try dir.write("replica.img.geminus-journal", journal)
        #expect(try disk.recover() == .replayed(Epoch(2)))
        #expect(try dir.read("replica.img") == epochs.imageAfterSecond)
        #expect(try disk.recover() == .clean)
    }

    /// A full epoch that is not live goes through the journal too (flagged to zero the disk
    /// first): a crash part-way replays to exactly the new image, nothing older surviving.
    @Test func aFullEpochIsJournaledAndReplaysOverATornImage() throws {
        let dir = try TempDir()
        let epochs = Epochs()
        let full = [DiskWrite(offset: 700_000, data: Self.block(9, 4096)), .zeroes(offset: 700_100, length: 10)]
        do {
            let disk = try diskAtFirstEpoch(dir)
            disk.crashAfterRecordWrites = 1
            #expect(throws: GeminusError.self) { try disk.commit(DiskCommit(epoch: Epoch(2), writes: full, replacesDisk: true, isLive: false)) }
        }
        let reopened = try openDisk(dir)
        #expect(reopened.lastRecovery == .replayed(Epoch(2)))
        let expected = DiskWrite.applied(full, to: epochs.imageAfterFirst, replacing: true)
        #expect(try dir.read("replica.img") == expected)
    }

    @Test(arguments: ["truncated", "bad checksum", "torn header", "bad magic"])
    func aTornOrDamagedJournalIsDiscardedAndTheImageIsThePreviousEpoch(damage: String) throws {
        let dir = try TempDir()
        let epochs = Epochs()
        do {
            let disk = try diskAtFirstEpoch(dir)
            disk.crashAfterRecordWrites = 0  // the journal is durable, nothing applied
            #expect(throws: GeminusError.self) { try disk.commit(DiskCommit(epoch: Epoch(2), writes: epochs.second, replacesDisk: false, isLive: false)) }
        }
        var journal = try dir.read("replica.img.geminus-journal")
        switch damage {
        case "truncated": journal.removeLast(1000)
        case "bad checksum": journal[DiskJournal.headerSize + DiskWrite.headerSize + 10] ^= 0x40  // a data byte of the first record
        case "torn header": journal = Array(journal.prefix(40))
        default: journal[0] ^= 0xFF
        }
        try dir.write("replica.img.geminus-journal", journal)
        let reopened = try openDisk(dir)
        guard case .discarded(let why) = reopened.lastRecovery else {
            Issue.record("a \(damage) journal was not discarded: \(reopened.lastRecovery)")
            return
        }
        #expect(!why.isEmpty)
        #expect(try dir.read("replica.img") == epochs.imageAfterFirst)
        #expect(try dir.size("replica.img.geminus-journal") == 0)
    }

    /// Live rounds are written directly, behind a durable "not resumable" marker; a crash then
    /// is reported as such, and the first paused epoch (even without writes) removes the marker.
    @Test func liveRoundsLeaveADurableNotResumableMarkerUntilAPausedEpoch() throws {
        let dir = try TempDir()
        do {
            let disk = try openDisk(dir)
            try disk.commit(DiskCommit(epoch: Epoch(1), writes: Epochs().first, replacesDisk: true, isLive: true))
            #expect(disk.isMarkedUnsafe)
            disk.crashAfterRecordWrites = 1
            #expect(throws: GeminusError.self) {
                try disk.commit(DiskCommit(epoch: Epoch(2), writes: Epochs().second, replacesDisk: false, isLive: true))
            }
        }
        let reopened = try openDisk(dir)
        #expect(reopened.lastRecovery == .notResumable)
        #expect(reopened.isMarkedUnsafe)

        // A live copy that completes, then a paused epoch without disk writes.
        try reopened.commit(DiskCommit(epoch: Epoch(3), writes: Epochs().first, replacesDisk: true, isLive: true))
        try reopened.commit(DiskCommit(epoch: Epoch(4), writes: [], replacesDisk: false, isLive: false))
        #expect(!reopened.isMarkedUnsafe)
        #expect(try dir.size("replica.img.geminus-journal") == 0)
        #expect(try openDisk(dir).lastRecovery == .clean)
        #expect(try dir.read("replica.img") == Epochs().imageAfterFirst)

        // Live again, then a paused epoch with writes: its journal replaces the marker.
        try reopened.commit(DiskCommit(epoch: Epoch(5), writes: [DiskWrite(offset: 0, data: [1, 2, 3])], replacesDisk: false, isLive: true))
        #expect(reopened.isMarkedUnsafe)
        reopened.crashAfterRecordWrites = 0
        #expect(throws: GeminusError.self) {
            try reopened.commit(DiskCommit(epoch: Epoch(6), writes: Epochs().second, replacesDisk: false, isLive: false))
        }
        let third = try openDisk(dir)
        #expect(third.lastRecovery == .replayed(Epoch(6)))
        let expected = DiskWrite.applied(Epochs().second, to: DiskWrite.applied([DiskWrite(offset: 0, data: [1, 2, 3])], to: Epochs().imageAfterFirst))
        #expect(try dir.read("replica.img") == expected)
    }

    @Test func anImageOfAnotherSizeIsRefusedNotTruncated() throws {
        let dir = try TempDir()
        let other = Self.block(6, 8192)
        try dir.write("replica.img", other)
        do {
            _ = try openDisk(dir)
            Issue.record("an 8 KiB image was accepted for a 1 MiB disk")
        } catch let error as GeminusError {
            #expect(error.code == .invalidArgument)
            #expect(error.message.contains("8192") && error.fix != nil, "\(error)")
        }
        #expect(try dir.read("replica.img") == other, "the operator's image was changed")

        // Empty: sized sparse. The right size: kept as it is.
        try dir.write("replica.img", [])
        _ = try openDisk(dir)
        #expect(try dir.size("replica.img") == UInt64(Self.size))
        var kept = [UInt8](repeating: 0, count: Self.size)
        kept[12345] = 42
        try dir.write("replica.img", kept)
        _ = try openDisk(dir)
        #expect(try dir.read("replica.img") == kept)

        // A journal of another disk's size is not replayed (nor thrown away) silently.
        try DiskJournal(path: dir.path + "/replica.img.geminus-journal").write(epoch: Epoch(3), diskSize: 4096, replacesDisk: false, writes: [])
        #expect(throws: GeminusError.self) { try openDisk(dir) }
    }

    @Test func zeroPunchesHolesInAFile() throws {
        let dir = try TempDir()
        let disk = try openDisk(dir)
        try disk.write(offset: 0, Self.block(3, Self.size))
        try disk.zero(offset: 4096, length: 3 * 4096)
        try disk.zero(offset: 100_001, length: 777)  // unaligned: the filesystem zeroes the partial blocks
        try disk.sync()
        let expected = DiskWrite.applied([.zeroes(offset: 4096, length: 3 * 4096), .zeroes(offset: 100_001, length: 777)], to: Self.block(3, Self.size))
        #expect(try dir.read("replica.img") == expected)
        #expect(throws: GeminusError.self) { try disk.zero(offset: UInt64(Self.size) - 10, length: 11) }
    }

    /// A loop device stands in for a block device (needs root and losetup); skipped, saying
    /// why, where one cannot be made.
    @Test func aBlockDeviceIsUsedAsItIsAndSizeChecked() throws {
        let dir = try TempDir()
        let backing = dir.path + "/loop.img"
        try dir.write("loop.img", Self.block(8, 4 << 20))
        guard let device = LoopDevice(file: backing) else { return }
        defer { device.detach() }
        #expect(throws: GeminusError.self) { try FileReplicaDisk(path: device.path, sizeBytes: 8 << 20, journalPath: dir.path + "/j") }
        let disk = try FileReplicaDisk(path: device.path, sizeBytes: 4 << 20, journalPath: dir.path + "/j")
        #expect(disk.isBlockDevice)
        var expected = Self.block(8, 4 << 20)
        // A journaled epoch with an unaligned zero write (BLKZEROOUT in the middle, written
        // zeros at the ends) and data.
        let writes: [DiskWrite] = [.zeroes(offset: 1000, length: 20_000), DiskWrite(offset: 5000, data: Self.block(9, 3000)),
                                   .zeroes(offset: 1 << 20, length: 1 << 20)]
        try disk.commit(DiskCommit(epoch: Epoch(1), writes: writes, replacesDisk: false, isLive: false))
        expected = DiskWrite.applied(writes, to: expected)
        #expect(try device.read() == expected)
        // A full epoch: the whole device zeroed first.
        let full = [DiskWrite(offset: 3 << 20, data: Self.block(10, 4096))]
        try disk.commit(DiskCommit(epoch: Epoch(2), writes: full, replacesDisk: true, isLive: false))
        #expect(try device.read() == DiskWrite.applied(full, to: expected, replacing: true))
        #expect(try dir.size("j") == 0)
    }
}

/// A fresh directory under the system's temporary directory, removed when dropped.
final class TempDir {
    let path: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "/geminus-disk-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw GeminusError(.io, "mkdtemp failed: \(String(cString: strerror(errno)))")
        }
        path = String(cString: made)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func read(_ name: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path + "/" + name) else { throw GeminusError(.io, "cannot read \(name)") }
        return [UInt8](data)
    }

    func read(_ name: String, at offset: UInt64, count: Int) throws -> [UInt8] {
        let fd = open(path + "/" + name, O_RDONLY)
        guard fd >= 0 else { throw GeminusError(.io, "cannot open \(name)") }
        defer { close(fd) }
        return try preadAll(fd, count: count, at: offset, what: name)
    }

    func write(_ name: String, _ bytes: [UInt8]) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path + "/" + name))
    }

    func size(_ name: String) throws -> UInt64 {
        let attributes = try FileManager.default.attributesOfItem(atPath: path + "/" + name)
        return (attributes[.size] as? NSNumber)?.uint64Value ?? 0
    }
}

/// `losetup -f --show FILE`, detached with `losetup -d`.
struct LoopDevice {
    let path: String

    init?(file: String) {
        guard geteuid() == 0 else {
            print("block-device test skipped: losetup needs root, this runs as uid \(geteuid())")
            return nil
        }
        let (status, output) = Self.run(["-f", "--show", file])
        guard status == 0, output.hasPrefix("/dev/") else {
            print("block-device test skipped: losetup -f --show failed (\(status)): \(output)")
            return nil
        }
        path = output
    }

    func detach() { _ = Self.run(["-d", path]) }

    func read() throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw GeminusError(.io, "cannot open \(path)") }
        defer { close(fd) }
        let size = lseek(fd, 0, SEEK_END)
        guard size >= 0 else { throw GeminusError(.io, "cannot find the size of \(path)") }
        return try preadAll(fd, count: Int(size), at: 0, what: path)
    }

    static func run(_ arguments: [String]) -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/losetup")
        if !FileManager.default.isExecutableFile(atPath: "/usr/sbin/losetup") { p.executableURL = URL(fileURLWithPath: "/sbin/losetup") }
        p.arguments = arguments
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        do { try p.run() } catch { return (-1, "\(error)") }
        p.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return (p.terminationStatus, text.trimmingCharacters(in: .whitespacesAndNewlines))
    }
}
