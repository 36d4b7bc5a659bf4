import Foundation
import Testing
import GeminusCore
@testable import GeminusQEMU

/// The disk mirror with a real QEMU: the tiny guest writes numbered blocks to its disk; the
/// full checkpoint carries the disk as it is, then every delta carries exactly the writes the
/// guest made in its epoch (one 512-byte write per block), so that the full copy plus the deltas
/// applied in order reproduce the primary's disk file byte for byte.
@Suite(.serialized, .enabled(if: VMEnv.enabled, VMEnv.skipReason))
struct ReplicatedDiskTests {
    static let diskSeqAddress = 0x200090

    @Test func fullCopyPlusDeltasIsThePrimarysDisk() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        var config = VMEnv.config(kernel: kernel, role: "disk", ramMiB: 32, append: "pages=8 disk=1 disk_every=4096 disk_blocks=64")
        config.addDisk(sizeBytes: 1 << 20)
        let disk = try #require(config.disk)
        defer { unlink(disk.path) }
        let guest = try QEMUGuest.launch(config, counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        try VMEnv.waitBooted(guest.memory)
        let replicated = try #require(guest.disk)
        replicated.export.collect { true }
        let deadline = Date().addingTimeInterval(10)
        while guest.memory.loadU64(at: Self.diskSeqAddress) < 100 && Date() < deadline { VMEnv.sleep(ms: 20) }

        let buffer = CheckpointBuffer(limitPages: guest.pageCount)
        try guest.pause()
        try guest.capture(full: true, into: buffer)
        var replica = [UInt8](repeating: 0, count: Int(disk.sizeBytes))
        replica = DiskWrite.applied(buffer.diskWrites, to: replica)
        let atFull = try Data(contentsOf: URL(fileURLWithPath: disk.path))
        let fullIsTheDisk = replica.elementsEqual(atFull)
        #expect(fullIsTheDisk, "the full copy is not the disk")
        #expect(!buffer.diskWrites.isEmpty, "the guest had written no block yet")
        #expect(replicated.export.isConnected, "the mirror did not connect after the full checkpoint")
        var seq = guest.memory.loadU64(at: Self.diskSeqAddress)
        #expect(seq >= 100)
        try guest.resume()

        for epoch in 0..<5 {
            VMEnv.sleep(ms: 150)
            try guest.pause()
            try guest.capture(full: false, into: buffer)
            let now = guest.memory.loadU64(at: Self.diskSeqAddress)
            #expect(now > seq, "epoch \(epoch): the guest wrote no block")
            #expect(buffer.diskSizeBytes == disk.sizeBytes)
            #expect(UInt64(buffer.diskWrites.count) == now - seq, "epoch \(epoch): \(buffer.diskWrites.count) writes for \(now - seq) blocks")
            #expect(buffer.diskWrites.allSatisfy { $0.data.count == 512 && $0.offset % 512 == 0 })
            replica = DiskWrite.applied(buffer.diskWrites, to: replica)
            let file = try Data(contentsOf: URL(fileURLWithPath: disk.path))
            let deltaIsTheDisk = replica.elementsEqual(file)
            #expect(deltaIsTheDisk, "epoch \(epoch): full copy + deltas differ from the primary's disk")
            seq = now
            try guest.resume()
        }
    }

    /// The live first copy of a disk: the first live round starts the mirror with `sync=full`,
    /// QEMU copies the whole disk into the export while the guest writes it, the rounds carry
    /// what arrived (zero regions as zero records) until the job is ready, and the pause ends
    /// it. Applied in order onto a replica that starts as garbage (the full epoch zeroes it
    /// first), the result is the primary's disk byte for byte; a delta after it still is.
    @Test func liveCopyWhileTheGuestWritesIsThePrimarysDisk() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        var config = VMEnv.config(kernel: kernel, role: "disklive", ramMiB: 32, append: "pages=8 disk=1 disk_every=4096 disk_blocks=64")
        config.addDisk(sizeBytes: 4 << 20)
        let disk = try #require(config.disk)
        defer { unlink(disk.path) }
        let guest = try QEMUGuest.launch(config, counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        try VMEnv.waitBooted(guest.memory)
        // Data beyond the guest's ring (the first 32 KiB): what only the bulk copy carries.
        let pattern = (0..<(2 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 12) }
        let fd = open(disk.path, O_WRONLY)
        #expect(pattern.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 1 << 20) } == pattern.count)
        close(fd)
        let replicated = try #require(guest.disk)
        // Nobody holds output: the export must keep the copy's writes on its own.
        replicated.export.collect { false }

        var replica = [UInt8](repeating: 0xEE, count: Int(disk.sizeBytes))
        var zeroRecords = 0
        func apply(_ b: CheckpointBuffer) {
            zeroRecords += b.diskWrites.filter(\.isZeroes).count
            replica = DiskWrite.applied(b.diskWrites, to: replica, replacing: b.isFull)
        }
        let buffer = CheckpointBuffer(limitPages: guest.pageCount)
        try guest.captureLive(full: true, into: buffer)
        #expect(buffer.isFull && buffer.isLive && buffer.diskSizeBytes == disk.sizeBytes)
        apply(buffer)
        var rounds = 0
        repeat {
            VMEnv.sleep(ms: 20)
            try guest.captureLive(full: false, into: buffer)
            apply(buffer)
            rounds += 1
        } while guest.liveCopyDevicesPending && rounds < 500
        #expect(!guest.liveCopyDevicesPending, "the mirror never caught up in \(rounds) rounds")
        try guest.pause()
        try guest.capture(full: false, into: buffer)
        apply(buffer)
        var file = try Data(contentsOf: URL(fileURLWithPath: disk.path))
        let liveIsTheDisk = replica.elementsEqual(file)
        #expect(liveIsTheDisk, "live copy + pause differ from the primary's disk")
        #expect(zeroRecords > 0, "the empty regions should cross as zero records")
        try guest.resume()

        // From here the port holds (a secondary is protected): the next delta is exact too.
        replicated.export.collect { true }
        VMEnv.sleep(ms: 150)
        try guest.pause()
        try guest.capture(full: false, into: buffer)
        #expect(!buffer.diskWrites.isEmpty, "the guest wrote no block")
        apply(buffer)
        file = try Data(contentsOf: URL(fileURLWithPath: disk.path))
        let afterIsTheDisk = replica.elementsEqual(file)
        #expect(afterIsTheDisk, "a delta after the live copy differs from the primary's disk")
        try guest.resume()
    }
}
