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
        for w in buffer.diskWrites { replica.replaceSubrange(Int(w.offset)..<Int(w.offset) + w.data.count, with: w.data) }
        let atFull = try Data(contentsOf: URL(fileURLWithPath: disk.path))
        #expect(replica.elementsEqual(atFull), "the full copy is not the disk")
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
            for w in buffer.diskWrites { replica.replaceSubrange(Int(w.offset)..<Int(w.offset) + w.data.count, with: w.data) }
            let file = try Data(contentsOf: URL(fileURLWithPath: disk.path))
            #expect(replica.elementsEqual(file), "epoch \(epoch): full copy + deltas differ from the primary's disk")
            seq = now
            try guest.resume()
        }
    }
}
