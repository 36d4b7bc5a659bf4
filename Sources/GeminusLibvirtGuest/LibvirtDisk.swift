import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusLibvirt
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// The replicated disk of an enrolled domain (`DomainDisk.replicated`): on the primary, the
/// mirror from the disk's node inside the domain's QEMU to the agent's export, the same
/// `ReplicatedDisk` as a QEMU the agent starts; on the standby, the image the replica's commits
/// are written to.
enum LibvirtDisk {
    /// The user libvirt runs QEMU as (libvirt-qemu on Debian, or qemu.conf's `user`): the
    /// export's socket is given to it.
    static var qemuUser: String? { try? LibvirtQEMUConf.read().qemuUser().name }

    static func exportSocketPath(domain: String) -> String { "\(PrivateQMP.directory)/\(domain).nbd" }

    /// The mirror of the running domain's writable disk (nil without one). `xml`: the live XML.
    /// The export takes connections from the domain's QEMU only (`qemuPID`, when libvirt's pid
    /// file names it; else from QEMU's user).
    static func open(xml: String, qmp: QMPClient, domainName: String, qemuPID: Int32?) throws(GeminusError) -> ReplicatedDisk? {
        guard let disk = try DomainDisk.replicated(inDomainXML: xml), let path = disk.sourcePath else { return nil }
        let node = try node(of: disk, path: path, qmp: qmp, domainName: domainName)
        try PrivateQMP.ensureDirectory()
        let replicated = try ReplicatedDisk(nodeName: node.name, imagePath: path, imageIsRaw: node.format == "raw", sizeBytes: node.sizeBytes,
                                            exportSocketPath: exportSocketPath(domain: domainName), clientUser: qemuUser)
        if let qemuPID { replicated.admit(.process(qemuPID)) }
        return replicated
    }

    /// The block node QEMU writes the disk through (the format node libvirt named), from
    /// `query-block`: the one writable device, which must be the disk's image, raw or qcow2.
    /// The mirror starts from that format node, so what it sends are guest-visible writes
    /// (virtual offsets) whatever the format; the size is the virtual size.
    static func node(of disk: DomainDisk, path: String, qmp: QMPClient, domainName: String) throws(GeminusError) -> (name: String, sizeBytes: UInt64, format: String) {
        let devices = (try qmp.execute("query-block") as? [[String: Any]]) ?? []
        let writable = devices.compactMap { $0["inserted"] as? [String: Any] }.filter { $0["ro"] as? Bool == false }
        guard writable.count == 1, let inserted = writable.first else {
            throw GeminusError(.hypervisor, "domain '\(domainName)' runs with \(writable.count) writable block devices, its definition has one (disk \(disk.target))",
                               fix: "restart the domain so that it runs its enrolled definition")
        }
        let image = inserted["image"] as? [String: Any]
        let file = (image?["filename"] as? String) ?? (inserted["file"] as? String) ?? "?"
        guard file == path else {
            throw GeminusError(.hypervisor, "domain '\(domainName)''s writable device opens \(file), its definition says \(path)",
                               fix: "restart the domain so that it runs its enrolled definition")
        }
        guard let name = inserted["node-name"] as? String, !name.isEmpty else {
            throw GeminusError(.hypervisor, "QEMU names no block node for disk \(disk.target) of '\(domainName)' (query-block)")
        }
        let format = (inserted["drv"] as? String) ?? "?"
        guard format == "raw" || format == "qcow2" else {
            throw GeminusError(.invalidArgument, "disk \(disk.target) of '\(domainName)' is opened as \(format): Geminus replicates raw and qcow2 images and block devices",
                               fix: "convert it on both hosts (`qemu-img convert -O raw` or `-O qcow2`) and set <driver name='qemu' type='raw'/> or type='qcow2'")
        }
        if let backing = inserted["backing_file"] as? String {
            throw GeminusError(.invalidArgument, "disk \(disk.target) of '\(domainName)' is an overlay on \(backing): Geminus replicates images without a backing chain",
                               fix: "flatten it on both hosts (`qemu-img convert -O qcow2 IMAGE FLAT.qcow2`) and point the domain at the flat image")
        }
        guard let size = (image?["virtual-size"] as? NSNumber)?.uint64Value, size > 0 else {
            throw GeminusError(.hypervisor, "QEMU reports no size for disk \(disk.target) of '\(domainName)'")
        }
        return (name, size, format)
    }

    /// The standby's image of the replicated disk (from this host's definition), written at
    /// commits; nil when the domain has no writable disk. A raw image (a file or block device)
    /// is written in place; a qcow2 image through a qemu-storage-daemon the returned disk
    /// runs (`StorageDaemonReplicaDisk`), which the standby releases before it resumes. The
    /// size is the image's own (virtual, for qcow2): a different size from the primary's is
    /// refused at the first epoch.
    static func replica(definition xml: String, domainName: String) throws(GeminusError) -> (any ReplicaDisk)? {
        guard let disk = try DomainDisk.replicated(inDomainXML: xml), let path = disk.sourcePath else { return nil }
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw GeminusError(.io, "cannot open the standby's image \(path) of disk \(disk.target): \(String(cString: strerror(errno)))",
                               fix: disk.isQCOW2 ? "create it on this host with the primary's virtual size (`qemu-img create -f qcow2 \(path) SIZE`)"
                                   : "create it on this host with the primary's size (`truncate -s SIZE \(path)` for a raw file)")
        }
        let size = lseek(fd, 0, SEEK_END)
        let header = [UInt8](unsafeUninitializedCapacity: 16) { buffer, count in count = max(0, pread(fd, buffer.baseAddress, 16, 0)) }
        close(fd)
        guard size > 0 else {
            throw GeminusError(.invalidArgument, "the standby's image \(path) of disk \(disk.target) is empty",
                               fix: disk.isQCOW2 ? "create it with the primary's virtual size (`qemu-img create -f qcow2 \(path) SIZE`)"
                                   : "size it like the primary's (`truncate -s SIZE \(path)` for a raw file)")
        }
        if disk.isQCOW2 {
            try checkQCOW2(header: header, path: path, disk: disk)
            try PrivateQMP.ensureDirectory()
            return try StorageDaemonReplicaDisk(imagePath: path, format: "qcow2", runDirectory: PrivateQMP.directory, name: domainName)
        }
        return try FileReplicaDisk(path: path, sizeBytes: UInt64(size))
    }

    /// The standby's image must be a qcow2 without a backing file (the daemon would otherwise
    /// refuse it, or read the base image's bytes where the guest's were not written).
    static func checkQCOW2(header: [UInt8], path: String, disk: DomainDisk) throws(GeminusError) {
        guard header.count == 16, header[0..<4] == [0x51, 0x46, 0x49, 0xfb] else {
            throw GeminusError(.invalidArgument, "the standby's image \(path) of disk \(disk.target) is not a qcow2 image, its definition says qcow2",
                               fix: "create it with `qemu-img create -f qcow2 \(path) SIZE` (the primary's virtual size)")
        }
        let backingOffset = header[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        guard backingOffset == 0 else {
            throw GeminusError(.invalidArgument, "the standby's image \(path) of disk \(disk.target) has a backing file: Geminus replicates images without a backing chain",
                               fix: "create it afresh with `qemu-img create -f qcow2 \(path) SIZE` (the first copy fills it)")
        }
    }
}
