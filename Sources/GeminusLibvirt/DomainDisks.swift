import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// A domain's `<disk>` elements as replication sees them: which one Geminus replicates, and why
/// the others cannot be (`CAEnrollmentCheck` reports those; the agents find the replicated one).
public struct DomainDisk: Sendable, Equatable {
    /// `<target dev>` (vda, sda...).
    public var target: String
    /// `file`, `block`, `network`, `volume`, ...
    public var type: String
    /// `disk`, `cdrom`, `floppy`, `lun`.
    public var device: String
    /// The image file or block device (`<source file|dev>`), nil for other types.
    public var sourcePath: String?
    /// `<driver type>`: raw, qcow2...; nil when the definition leaves it to libvirt (raw).
    public var format: String?
    public var isReadOnly: Bool
    public var isShareable: Bool
    /// `<transient/>`: QEMU writes to an overlay thrown away at shutdown.
    public var isTransient: Bool
    /// `<driver discard>`: `unmap` passes the guest's discards to the image.
    public var discard: String? = nil
    /// The file of a `<backingStore>` with a `<source>` (an overlay's base image); nil without
    /// one (`<backingStore/>`, or none in an inactive definition: libvirt finds the chain at
    /// start, and the agents check the image itself).
    public var backingFile: String? = nil

    /// The formats Geminus replicates: raw in place, qcow2 through QEMU's driver.
    public static let replicableFormats = ["raw", "qcow2"]
    /// A qcow2 image: its replica is written through qemu-storage-daemon (docs/DISKS.md).
    public var isQCOW2: Bool { format == "qcow2" }

    /// The guest can write it: what must be replicated for its memory and disk to agree.
    public var isWritable: Bool { !isReadOnly && device != "cdrom" && device != "floppy" }

    /// nil when Geminus can replicate this writable disk, else why not and what to do.
    public var whyNotReplicable: (message: String, fix: String)? {
        let name = "disk \(target)"
        switch type {
        case "file", "block": break
        case "network":
            return ("\(name) is a network disk (RBD, iSCSI, NBD...): its storage is shared between the hosts, so a failover would resume the standby on writes of epochs that were never committed",
                    "copy it to a local raw image or block device on each host (`qemu-img convert -O raw`), or protect the VM with `geminus ha` (restart from its disk)")
        default:
            return ("\(name) is of type '\(type)': Geminus replicates local raw images and block devices only",
                    "define it as <disk type='file'> or <disk type='block'> with a raw image on each host")
        }
        if isShareable {
            return ("\(name) is <shareable/>: another VM or host may write it, and those writes are not in this VM's checkpoints",
                    "give the VM its own image (remove <shareable/>), or make it <readonly/>")
        }
        if isTransient {
            return ("\(name) is <transient/>: its writes go to an overlay the mirror does not see",
                    "remove <transient/>")
        }
        if let format, !Self.replicableFormats.contains(format) {
            return ("\(name) is a \(format) image: Geminus replicates raw and qcow2 images and block devices",
                    "convert it on both hosts (`qemu-img convert -O qcow2 IMAGE IMAGE.qcow2`, or `-O raw`) and set <driver name='qemu' type='qcow2'/> (or 'raw')")
        }
        if isQCOW2 && type == "block" {
            return ("\(name) is a qcow2 image on a block device: Geminus replicates qcow2 images in files, and raw block devices",
                    "use the block device raw (<driver type='raw'/>, `qemu-img convert -O raw` onto it), or keep the qcow2 image in a file")
        }
        if let backingFile {
            return ("\(name) is an overlay on the backing image \(backingFile): Geminus replicates what the guest writes into the top image, and the standby's backing chain could differ from the primary's",
                    "flatten it on both hosts (`qemu-img convert -O qcow2 IMAGE FLAT.qcow2`, which copies the backing data in) and point the domain at the flat image")
        }
        if discard == "unmap" {
            return ("\(name) passes the guest's discards to its image (discard='unmap'): the mirror does not carry discards, so the standby's image would keep bytes the primary's dropped",
                    "remove discard='unmap' from its <driver> (discards are then ignored on both hosts)")
        }
        if sourcePath == nil {
            return ("\(name) has no <source>: there is nothing to replicate", "give it a <source file=...> or <source dev=...>")
        }
        return nil
    }

    /// Every `<disk>` of a domain definition, in order.
    public static func all(inDomainXML xml: String) throws(GeminusError) -> [DomainDisk] {
        let doc: XMLDocument
        do { doc = try parseXMLStrictly(xml) } catch {
            throw GeminusError(.invalidArgument, "the domain XML does not parse: \(error)")
        }
        guard let root = doc.rootElement() else { throw GeminusError(.invalidArgument, "the domain XML has no root element") }
        return of(devices: root.child("devices"))
    }

    static func of(devices: XMLElement?) -> [DomainDisk] {
        (devices?.children("disk") ?? []).map { d in
            let source = d.child("source")
            return DomainDisk(target: d.child("target")?.attr("dev") ?? "?", type: d.attr("type") ?? "file",
                              device: d.attr("device") ?? "disk", sourcePath: source?.attr("file") ?? source?.attr("dev"),
                              format: d.child("driver")?.attr("type"), isReadOnly: d.child("readonly") != nil,
                              isShareable: d.child("shareable") != nil, isTransient: d.child("transient") != nil,
                              discard: d.child("driver")?.attr("discard"),
                              backingFile: d.child("backingStore")?.child("source").map { $0.attr("file") ?? $0.attr("dev") ?? "?" })
        }
    }

    /// The one disk the agents replicate: the domain's only writable disk, nil without one. A
    /// domain with more than one writable disk, or one that cannot be replicated, is an error
    /// with the reason (enrolment refuses such a domain with the same words).
    public static func replicated(inDomainXML xml: String) throws(GeminusError) -> DomainDisk? {
        let writable = try all(inDomainXML: xml).filter(\.isWritable)
        if let bad = writable.first(where: { $0.whyNotReplicable != nil }), let why = bad.whyNotReplicable {
            throw GeminusError(.invalidArgument, why.message, fix: why.fix)
        }
        guard writable.count <= 1 else {
            throw GeminusError(.invalidArgument, "\(writable.count) writable disks (\(writable.map(\.target).joined(separator: ", "))): Geminus replicates one writable disk per domain today",
                               fix: "keep one writable disk and make the others <readonly/>, or protect the VM with `geminus ha`")
        }
        return writable.first
    }
}
