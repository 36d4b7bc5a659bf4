import Foundation
import Testing
import GeminusCore
import GeminusLibvirt
@testable import GeminusLibvirtGuest
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// The standby's qcow2 replica from a domain definition: the image's own header is checked (a
/// backing file, or not qcow2 at all, is refused with the reason before any daemon starts), and
/// a plain qcow2 is opened through qemu-storage-daemon with its virtual size.
@Suite struct LibvirtDiskTests {
    static func xml(_ image: String) -> String {
        """
        <domain type='kvm'><name>qd</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type></os>
          <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='\(image)'/>
            <target dev='vda' bus='virtio'/></disk></devices></domain>
        """
    }

    static func qemuImg(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
        p.arguments = args
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw GeminusError(.io, "qemu-img \(args) failed") }
    }

    static func failure(_ body: () throws(GeminusError) -> Void) -> GeminusError? {
        do throws(GeminusError) {
            try body()
            return nil
        } catch {
            return error
        }
    }

    @Test func theStandbysQCOW2IsCheckedThenOpenedThroughTheDaemon() throws {
        guard access("/usr/bin/qemu-img", X_OK) == 0, QEMULauncher.locate("qemu-storage-daemon") != nil else {
            print("skipped: needs qemu-img (qemu-utils) and qemu-storage-daemon")
            return
        }
        let dir = NSTemporaryDirectory() + "geminus-lvdisk-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.qemuImg(["create", "-q", "-f", "qcow2", dir + "/base.qcow2", "8M"])
        try Self.qemuImg(["create", "-q", "-f", "qcow2", "-b", dir + "/base.qcow2", "-F", "qcow2", dir + "/top.qcow2"])
        _ = FileManager.default.createFile(atPath: dir + "/raw.img", contents: Data(count: 8 << 20))

        let overlay = Self.failure { () throws(GeminusError) in _ = try LibvirtDisk.replica(definition: Self.xml(dir + "/top.qcow2"), domainName: "qd") }
        #expect(overlay?.message.contains("has a backing file") == true && overlay?.fix != nil, "\(String(describing: overlay))")
        let raw = Self.failure { () throws(GeminusError) in _ = try LibvirtDisk.replica(definition: Self.xml(dir + "/raw.img"), domainName: "qd") }
        #expect(raw?.message.contains("is not a qcow2 image") == true, "\(String(describing: raw))")

        // The daemon's socket lives in /run/geminus/qmp (root's).
        guard geteuid() == 0 else { print("skipped the daemon half: needs root for \(PrivateQMP.directory)"); return }
        defer { unlink(PrivateQMP.directory + "/geminus-test-qd.replica.log") }
        let disk = try #require(try LibvirtDisk.replica(definition: Self.xml(dir + "/base.qcow2"), domainName: "geminus-test-qd") as? StorageDaemonReplicaDisk)
        #expect(disk.sizeBytes == 8 << 20, "the virtual size, not the file's")
        try disk.commit(DiskCommit(epoch: Epoch(1), writes: [DiskWrite(offset: 4096, data: [1, 2, 3])], replacesDisk: false, isLive: false))
        guard case .success = disk.release() else { Issue.record("release failed"); return }
        #expect(!disk.daemon.isRunning)
    }
}
