import Foundation
import Testing
@testable import GeminusCore
@testable import GeminusQEMU

/// A qcow2 replica: `NBDClient` against the agent's own export (the same protocol, in-process),
/// then `StorageDaemonReplicaDisk` against a real qemu-storage-daemon on a temporary qcow2
/// image: the guest-visible bytes (read back through QEMU's driver) are the committed epochs,
/// a crash part-way through an epoch replays it whole, and the image stays consistent.
@Suite(.serialized) struct QCOW2ReplicaDiskTests {
    static func block(_ seed: UInt8, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: Int(seed) &* 31 &+ $0 &* 13 &+ 7) } }


    /// The error `body` throws, nil if it returns.
    static func failure(_ body: () throws(GeminusError) -> Void) -> GeminusError? {
        do throws(GeminusError) {
            try body()
            return nil
        } catch {
            return error
        }
    }

    static func temporaryDirectory() throws -> String {
        let dir = NSTemporaryDirectory() + "geminus-qcow2-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func theClientWritesZeroesAndFlushesThroughTheExportWhichRefusesReadsOfANonRawImage() throws {
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size: UInt64 = 16 << 20
        // No disk file: what a qcow2 primary's export gets.
        let export = try NBDExport(socketPath: dir + "/nbd", diskPath: nil, sizeBytes: size)
        defer { export.stop() }
        export.keepAll(true)
        let client = try NBDClient(socketPath: dir + "/nbd", exportName: export.exportName, timeout: 2)
        #expect(client.sizeBytes == size)
        #expect(client.transmissionFlags & NBDClient.flagSendFlush != 0 && client.transmissionFlags & NBDClient.flagSendWriteZeroes != 0)

        let big = Self.block(3, 5 << 20)  // over one request: split in two
        try client.write(offset: 4096, [1, 2, 3])
        try client.writeZeroes(offset: 8192, length: 1 << 20)
        try client.write(offset: 1 << 20, big)
        try client.flush()
        #expect(export.take() == [DiskWrite(offset: 4096, data: [1, 2, 3]), .zeroes(offset: 8192, length: 1 << 20),
                                  DiskWrite(offset: 1 << 20, data: Array(big[0..<(4 << 20)])),
                                  DiskWrite(offset: 5 << 20, data: Array(big[(4 << 20)...]))])
        // Beyond the disk: the server's EINVAL, with the request in the message.
        let beyond = Self.failure { () throws(GeminusError) in try client.write(offset: size - 1, [1, 2]) }
        #expect(beyond?.message.contains("writing 2 bytes at \(size - 1)") == true, "\(String(describing: beyond))")
        client.disconnect()
        #expect(throws: GeminusError.self) { try client.flush() }

        // A READ of a non-raw image's export: EIO, never the file's bytes.
        let c = NBDExportTests.Client(fd: try UnixSocket.connect(path: dir + "/nbd", timeout: 2, what: "the export"))
        defer { close(c.fd) }
        _ = c.get(18)
        c.put(NBDExportTests.Client.be(0x3, 4))
        let name = Array(export.exportName.utf8)
        c.option(7, NBDExportTests.Client.be(UInt64(name.count), 4) + name + NBDExportTests.Client.be(0, 2))
        _ = c.reply()
        #expect(c.reply().0 == 1)
        c.request(0, handle: 9, offset: 0, length: 512)
        #expect(c.simpleReply() == (5, 9))
    }

    /// qemu-img and qemu-storage-daemon, or nil (the test is skipped, saying why).
    static func tools() -> (qemuImg: String, daemon: String)? {
        guard let img = QEMULauncher.locate("qemu-img"), let qsd = QEMULauncher.locate("qemu-storage-daemon") else {
            print("qcow2 replica test skipped: needs qemu-img (qemu-utils) and qemu-storage-daemon (qemu-system-common)")
            return nil
        }
        return (img, qsd)
    }

    static func run(_ exe: String, _ args: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw GeminusError(.io, "\(exe) \(args.joined(separator: " ")) failed: \(text)") }
        return text
    }

    /// The image's guest-visible bytes, read through QEMU's qcow2 driver.
    static func guestBytes(_ qemuImg: String, _ image: String) throws -> [UInt8] {
        let raw = image + ".raw"
        defer { unlink(raw) }
        _ = try run(qemuImg, ["convert", "-f", "qcow2", "-O", "raw", image, raw])
        guard let data = FileManager.default.contents(atPath: raw) else { throw GeminusError(.io, "cannot read \(raw)") }
        return [UInt8](data)
    }

    @Test func aQCOW2ReplicaHoldsTheCommittedEpochsAndACrashReplaysOneWhole() throws {
        guard let qemuImg = Self.tools()?.qemuImg else { return }
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 8 << 20
        let image = dir + "/replica.qcow2"
        _ = try Self.run(qemuImg, ["create", "-q", "-f", "qcow2", image, "\(size)"])

        let first: [DiskWrite] = [DiskWrite(offset: 0, data: Self.block(1, 300_000)), DiskWrite(offset: 5 << 20, data: Self.block(2, 2 << 20)),
                                  .zeroes(offset: 50_000, length: 10_000)]
        let second: [DiskWrite] = [DiskWrite(offset: 10_000, data: Self.block(3, 70_000)), .zeroes(offset: 40_000, length: 5 << 20),
                                   DiskWrite(offset: 45_000, data: Self.block(4, 5000)), DiskWrite(offset: 7 << 20, data: Self.block(5, 4096)),
                                   .zeroes(offset: 0, length: 100)]
        let afterFirst = DiskWrite.applied(first, to: [UInt8](repeating: 0, count: size), replacing: true)
        let afterSecond = DiskWrite.applied(second, to: afterFirst)

        do {
            let disk = try StorageDaemonReplicaDisk(imagePath: image, runDirectory: dir, name: "t")
            #expect(disk.sizeBytes == UInt64(size), "the qcow2's virtual size, from the NBD handshake")
            #expect(disk.lastRecovery == .clean)
            // A live first copy, then the paused epoch that makes it a checkpoint.
            try disk.commit(DiskCommit(epoch: Epoch(1), writes: first, replacesDisk: true, isLive: true))
            try disk.commit(DiskCommit(epoch: Epoch(2), writes: [], replacesDisk: false, isLive: false))
            // A journaled epoch interrupted after two records: the daemon goes, as in a crash of the agent.
            disk.journaled.crashAfterRecordWrites = 2
            #expect(throws: GeminusError.self) { try disk.commit(DiskCommit(epoch: Epoch(3), writes: second, replacesDisk: false, isLive: false)) }
            let t0 = Monotonic.nanos()
            guard case .success = disk.release() else { Issue.record("release failed"); return }
            print("qcow2 replica: release (FLUSH, DISC, QMP quit and exit) took \((Monotonic.nanos() - t0) / 1000) us")
            #expect(!disk.daemon.isRunning)
            #expect(throws: GeminusError.self) { try disk.write(offset: 0, [1]) }
            let torn = try Self.guestBytes(qemuImg, image)
            #expect(torn != afterSecond && torn != afterFirst, "the crash should have stopped the apply part-way")
        }
        // Reopened: the journal replays epoch 3 whole through a new daemon.
        let reopened = try StorageDaemonReplicaDisk(imagePath: image, runDirectory: dir, name: "t")
        #expect(reopened.lastRecovery == .replayed(Epoch(3)))
        // A full paused epoch over it (zeroes the whole disk through WRITE_ZEROES first).
        let full = [DiskWrite(offset: 3 << 20, data: Self.block(9, 65536))]
        try reopened.commit(DiskCommit(epoch: Epoch(4), writes: full, replacesDisk: true, isLive: false))
        try reopened.commit(DiskCommit(epoch: Epoch(5), writes: second, replacesDisk: false, isLive: false))
        var times: [UInt64] = []
        guard case .success(let nanos) = reopened.release() else { Issue.record("release failed"); return }
        times.append(nanos)
        #expect(try Self.guestBytes(qemuImg, image) == DiskWrite.applied(second, to: DiskWrite.applied(full, to: afterSecond, replacing: true)))
        _ = try Self.run(qemuImg, ["check", "-q", "-f", "qcow2", image])
        #expect((try FileManager.default.attributesOfItem(atPath: image + ".geminus-journal")[.size] as? NSNumber)?.uint64Value == 0)

        // What stopping the daemon costs a takeover (measured, printed for docs/DISKS.md).
        for _ in 0..<4 {
            let d = try StorageDaemonReplicaDisk(imagePath: image, runDirectory: dir, name: "t")
            try d.commit(DiskCommit(epoch: Epoch(6), writes: [DiskWrite(offset: 0, data: Self.block(7, 4096))], replacesDisk: false, isLive: false))
            if case .success(let n) = d.release() { times.append(n) }
        }
        print("qcow2 replica: release times \(times.map { "\($0 / 1000) us" }.joined(separator: ", "))")
    }

    @Test func aDaemonLeftByADeadAgentIsStoppedAndAnotherFormatIsRefusedWithTheLog() throws {
        guard let tools = Self.tools() else { return }
        let (qemuImg, qsd) = tools
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = dir + "/replica.qcow2"
        _ = try Self.run(qemuImg, ["create", "-q", "-f", "qcow2", image, "1M"])
        // A daemon an earlier agent started on the same socket, not ours to wait for.
        let leftover = Process()
        leftover.executableURL = URL(fileURLWithPath: qsd)
        leftover.arguments = StorageDaemon.arguments(imagePath: image, format: "qcow2", socketPath: dir + "/t.replica.nbd", pidPath: dir + "/t.replica.pid",
                                                      qmpPath: dir + "/t.replica.qmp")
        try leftover.run()
        #expect(SerialOutputTests.waitFor { access(dir + "/t.replica.nbd", F_OK) == 0 })
        let disk = try StorageDaemonReplicaDisk(imagePath: image, runDirectory: dir, name: "t")
        #expect(SerialOutputTests.waitFor { !leftover.isRunning }, "the leftover daemon holds the image's write lock: it must be gone")
        disk.release()

        // A raw file opened as qcow2: the daemon exits, and its words are in the error.
        let raw = dir + "/raw.img"
        _ = FileManager.default.createFile(atPath: raw, contents: Data(count: 1 << 20))
        let refused = Self.failure { () throws(GeminusError) in _ = try StorageDaemonReplicaDisk(imagePath: raw, runDirectory: dir, name: "r") }
        #expect(refused?.message.contains("exited at its start") == true && refused?.message.lowercased().contains("qcow") == true,
                "\(String(describing: refused))")
    }
}
