import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Whether a libvirt domain can be protected in continuous-availability mode, judged from its
/// XML alone: every reason it cannot, each with exactly what to change, and the facts the
/// secondary must match.
///
/// Why these rules: the agent reads guest RAM from QEMU's shared RAM file and finds dirty pages
/// by write tracking (or compare). Pages discarded by a balloon, free-page reporting or
/// virtio-mem change without being reported; memory written by vhost-user back ends, vDPA or
/// VFIO devices bypasses QEMU's mapping; memory outside the main RAM file (DIMMs, ivshmem) is
/// not replicated at all.
public struct CAEnrollmentCheck: Sendable, Equatable {
    /// Stable problem codes (scripts match on these).
    public enum Code: String, Sendable, CaseIterable {
        case invalidXML = "invalid-xml"
        case domainType = "domain-type"
        case memorySource = "memory-source"
        case memoryAccess = "memory-access"
        case memoryBalloon = "memory-balloon"
        case virtioMem = "virtio-mem"
        case memoryDevice = "memory-device"
        case memoryHotplug = "memory-hotplug"
        case vhostUser = "vhost-user"
        case vdpa = "vdpa"
        case hostdev = "hostdev"
        case sharedMemoryDevice = "shmem"
        /// A writable disk: a libvirt domain's disks are not replicated (docs/DISKS.md).
        case unreplicatedDisk = "unreplicated-disk"
        /// No private QMP socket for the agent in <qemu:commandline>.
        case privateQMP = "private-qmp"
    }

    public struct Problem: Sendable, Equatable, CustomStringConvertible {
        public var code: Code
        public var message: String
        public var fix: String
        public var description: String { "[\(code.rawValue)] \(message); \(fix)" }
    }

    /// What the secondary's definition must match (from the XML as given: define the domain
    /// and read libvirt's XML to get the expanded machine type, e.g. `pc` → `pc-i440fx-7.2`).
    public struct Facts: Sendable, Equatable {
        public var name: String?
        public var uuid: String?
        public var domainType: String?
        public var arch: String?
        public var machineType: String?
        public var emulator: String?
        public var memoryKiB: UInt64?
        public var vcpus: Int?
        public var hugepages: Bool

        /// What differs between this (the primary's) facts and the secondary's, one line each;
        /// empty when the secondary can resume this domain's checkpoints. Name and UUID are
        /// not compared. A value missing on either side counts as a difference.
        public func differences(from peer: Facts) -> [String] {
            var out: [String] = []
            func cmp<V: Equatable>(_ what: String, _ a: V?, _ b: V?) {
                if a == nil || b == nil || a != b {
                    out.append("\(what): \(a.map { "\($0)" } ?? "not set") here, \(b.map { "\($0)" } ?? "not set") on the peer")
                }
            }
            cmp("domain type", domainType, peer.domainType)
            cmp("architecture", arch, peer.arch)
            cmp("machine type", machineType, peer.machineType)
            cmp("emulator", emulator, peer.emulator)
            cmp("memory (KiB)", memoryKiB, peer.memoryKiB)
            cmp("vCPUs", vcpus, peer.vcpus)
            cmp("hugepages", hugepages, peer.hugepages)
            return out
        }

        public init(name: String? = nil, uuid: String? = nil, domainType: String? = nil, arch: String? = nil,
                    machineType: String? = nil, emulator: String? = nil, memoryKiB: UInt64? = nil,
                    vcpus: Int? = nil, hugepages: Bool = false) {
            self.name = name
            self.uuid = uuid
            self.domainType = domainType
            self.arch = arch
            self.machineType = machineType
            self.emulator = emulator
            self.memoryKiB = memoryKiB
            self.vcpus = vcpus
            self.hugepages = hugepages
        }
    }

    public var problems: [Problem]
    public var facts: Facts

    public var canProtect: Bool { problems.isEmpty }

    /// The problems as one operator error (nil when there are none).
    public var error: GeminusError? {
        guard !problems.isEmpty else { return nil }
        let who = facts.name.map { "domain '\($0)'" } ?? "the domain"
        let list = problems.map { "\($0.message) (fix: \($0.fix))" }.joined(separator: "; ")
        return GeminusError(.invalidArgument, "\(who) cannot be protected in CA mode: \(list)",
                            fix: "`geminus enroll --prepare` fixes the memory backing, the balloon and the private QMP socket; the other changes are yours to make")
    }


    // MARK: Check

    public init(xml: String) {
        let doc: XMLDocument
        do {
            doc = try parseXMLStrictly(xml)
        } catch {
            self.init(problems: [Problem(code: .invalidXML, message: "the domain XML does not parse (\(error))",
                                         fix: "pass the output of `virsh dumpxml DOMAIN`")],
                      facts: Facts(hugepages: false))
            return
        }
        guard let root = doc.rootElement(), root.name == "domain" else {
            self.init(problems: [Problem(code: .invalidXML, message: "the XML's root element is not <domain>",
                                         fix: "pass the output of `virsh dumpxml DOMAIN`")],
                      facts: Facts(hugepages: false))
            return
        }
        self.init(root: root)
    }

    public init(problems: [Problem], facts: Facts) {
        self.problems = problems
        self.facts = facts
    }

    init(root: XMLElement) {
        var problems: [Problem] = []
        func add(_ code: Code, _ message: String, _ fix: String) {
            problems.append(Problem(code: code, message: message, fix: fix))
        }

        let backing = root.child("memoryBacking")
        let hugepages = backing?.child("hugepages") != nil
        let os = root.child("os")
        let devices = root.child("devices")
        var facts = Facts(hugepages: hugepages)
        facts.name = root.child("name")?.text
        facts.uuid = root.child("uuid")?.text
        facts.domainType = root.attr("type")
        facts.arch = os?.child("type")?.attr("arch")
        facts.machineType = os?.child("type")?.attr("machine")
        facts.emulator = devices?.child("emulator")?.text
        facts.memoryKiB = root.child("memory").flatMap { CAEnrollmentCheck.kibibytes($0.text, unit: $0.attr("unit")) }
        facts.vcpus = root.child("vcpu").flatMap { Int($0.text) }

        // Domain type.
        switch facts.domainType {
        case "qemu", "kvm": break
        case let t?:
            add(.domainType, "domain type '\(t)' is not QEMU", "Geminus protects only QEMU domains: <domain type='kvm'> (or type='qemu' for software emulation)")
        case nil:
            add(.domainType, "the <domain> element has no type", "set <domain type='kvm'> (or type='qemu' for software emulation)")
        }

        // Memory backing: guest RAM in a shared file the agent can map.
        let sourceType = backing?.child("source")?.attr("type")
        if hugepages {
            if let s = sourceType, s != "file" {
                add(.memorySource, "guest RAM with hugepages comes from a '\(s)' source, not a file",
                    "remove <source type='\(s)'/> from <memoryBacking> (hugepages are then backed by a hugetlbfs file) or use <source type='file'/>")
            }
        } else if sourceType != "file" {
            let now = sourceType.map { "a '\($0)' source" } ?? "anonymous memory (no <memoryBacking><source>)"
            add(.memorySource, "guest RAM is \(now), not a file the agent can read",
                "put <source type='file'/> in <memoryBacking> and set memory_backing_dir in /etc/libvirt/qemu.conf (e.g. a directory on /dev/shm)")
        }
        let access = backing?.child("access")?.attr("mode")
        let cells = root.child("cpu")?.child("numa")?.children("cell") ?? []
        let privateCells = cells.filter { $0.attr("memAccess") == "private" }
        let cellsAllShared = !cells.isEmpty && cells.allSatisfy { $0.attr("memAccess") == "shared" }
        if !privateCells.isEmpty {
            let ids = privateCells.map { $0.attr("id") ?? "?" }.joined(separator: ", ")
            add(.memoryAccess, "NUMA cell \(ids) maps guest RAM private (memAccess='private')",
                "set memAccess='shared' on every <cell> in <cpu><numa>, or remove the attribute and use <access mode='shared'/> in <memoryBacking>")
        } else if access != "shared" && !cellsAllShared {
            let now = access.map { "mapped '\($0)'" } ?? "mapped private (no <memoryBacking><access>)"
            add(.memoryAccess, "guest RAM is \(now), so QEMU's writes do not reach the RAM file",
                "put <access mode='shared'/> in <memoryBacking>")
        }

        // Balloon: libvirt adds a virtio balloon to x86 domains that name none.
        let balloons = devices?.children("memballoon") ?? []
        if balloons.isEmpty {
            add(.memoryBalloon, "the domain has no <memballoon> element, so libvirt gives it a virtio balloon, which discards guest pages behind write tracking's back",
                "add <memballoon model='none'/> to <devices>")
        }
        for b in balloons where b.attr("model") != "none" {
            let extra = b.child("freePageReporting") != nil || b.attr("freePageReporting") == "on" ? " with free-page reporting" : ""
            add(.memoryBalloon, "memory balloon model '\(b.attr("model") ?? "?")'\(extra) discards guest pages behind write tracking's back",
                "replace the <memballoon> element with <memballoon model='none'/>")
        }

        // Memory devices and hotplug.
        for m in devices?.children("memory") ?? [] {
            let model = m.attr("model") ?? "?"
            if model == "virtio-mem" {
                add(.virtioMem, "a virtio-mem device adds and discards guest memory behind write tracking's back and lives outside the main RAM file",
                    "remove the <memory model='virtio-mem'> device and give the domain that memory in <memory>")
            } else {
                add(.memoryDevice, "a <memory model='\(model)'> device keeps guest memory outside the main RAM file, which is not replicated",
                    "remove the <memory model='\(model)'> device and give the domain that memory in <memory>")
            }
        }
        if root.child("maxMemory") != nil {
            add(.memoryHotplug, "<maxMemory> enables memory hotplug, whose memory is not replicated",
                "remove the <maxMemory> element")
        }

        // Devices that write guest RAM without going through QEMU's mapping.
        for i in devices?.children("interface") ?? [] {
            let mac = i.child("mac")?.attr("address").map { " \($0)" } ?? ""
            switch i.attr("type") {
            case "vhostuser":
                add(.vhostUser, "interface\(mac) is vhost-user: its back end writes guest RAM without going through QEMU",
                    "use an interface of type 'network' or 'bridge' (QEMU or vhost-net virtio) instead of type 'vhostuser'")
            case "vdpa":
                add(.vdpa, "interface\(mac) is vDPA: the device writes guest RAM by DMA",
                    "use an interface of type 'network' or 'bridge' instead of type 'vdpa'")
            case "hostdev":
                add(.hostdev, "interface\(mac) passes a host PCI function through (VFIO): it writes guest RAM by DMA and does not exist on the secondary",
                    "use an interface of type 'network' or 'bridge' instead of type 'hostdev'")
            default: break
            }
        }
        for d in devices?.children("disk") ?? [] {
            let target = d.child("target")?.attr("dev").map { " \($0)" } ?? ""
            switch d.attr("type") {
            case "vhostuser":
                add(.vhostUser, "disk\(target) is vhost-user: its back end writes guest RAM without going through QEMU",
                    "attach the storage as a file, block or network disk served by QEMU instead of type 'vhostuser'")
            case "vhostvdpa":
                add(.vdpa, "disk\(target) is vDPA: the device writes guest RAM by DMA",
                    "attach the storage as a file, block or network disk served by QEMU instead of type 'vhostvdpa'")
            default:
                // Geminus replicates the disks of a QEMU it starts (--disk-mib), not yet a
                // libvirt domain's: after a failover the standby would run on its own copy (not
                // the committed state) or, on shared storage, on writes of epochs never committed.
                let device = d.attr("device") ?? "disk"
                if device == "disk" && d.child("readonly") == nil {
                    add(.unreplicatedDisk, "disk\(target) is writable, and Geminus does not replicate a libvirt domain's disks yet: after a failover the standby would run on a disk that does not match its memory (its own copy, or shared storage holding writes of epochs that were never committed)",
                        "make the disk read-only (<readonly/>), or protect the VM with `geminus ha` (restart from its disk) instead of CA; a QEMU guest the agent starts can have a replicated disk (--disk-mib, docs/DISKS.md)")
                }
            }
        }
        for f in devices?.children("filesystem") ?? [] where f.child("driver")?.attr("type") == "virtiofs" {
            let target = f.child("target")?.attr("dir").map { " '\($0)'" } ?? ""
            add(.vhostUser, "filesystem\(target) uses virtiofs, a vhost-user back end (virtiofsd) that writes guest RAM without going through QEMU",
                "remove the virtiofs <filesystem> and share the files over the network (NFS) instead")
        }
        for v in devices?.children("video") ?? [] where v.child("driver")?.attr("name") == "vhostuser" {
            add(.vhostUser, "video device uses a vhost-user back end that writes guest RAM without going through QEMU",
                "remove <driver name='vhostuser'/> from the <video> device")
        }
        for h in devices?.children("hostdev") ?? [] {
            let type = h.attr("type") ?? "?"
            if type == "pci" || type == "mdev" {
                add(.hostdev, "a <hostdev type='\(type)'> passes a host device through (VFIO): it writes guest RAM by DMA and does not exist on the secondary",
                    "remove the <hostdev type='\(type)'> device; give the guest an emulated or virtio device instead")
            } else {
                add(.hostdev, "a <hostdev type='\(type)'> passes a device of this host through; the secondary cannot resume it",
                    "remove the <hostdev type='\(type)'> device")
            }
        }
        if !(devices?.children("shmem") ?? []).isEmpty {
            add(.sharedMemoryDevice, "a <shmem> (ivshmem) device maps memory that other processes write and that is not replicated",
                "remove the <shmem> device")
        }

        // The agent's own QMP socket: stop/save/cont through libvirt's passthrough take ~20 ms
        // a round trip, over a direct socket ~2 ms.
        if let name = facts.name {
            let wanted = CAEnrollmentCheck.privateQMPArguments(domain: name)
            if !CAEnrollmentCheck.containsSequence(CAEnrollmentCheck.qemuCommandLineArguments(root), wanted) {
                add(.privateQMP, "the domain has no private QMP socket for the agent (\(wanted.joined(separator: " ")) in <qemu:commandline>)",
                    "run `geminus enroll \(name) --prepare`, or add <qemu:arg value='\(wanted[0])'/><qemu:arg value='\(wanted[1])'/> to <qemu:commandline xmlns:qemu='\(CAEnrollmentCheck.qemuNamespace)'>")
            }
        } else {
            add(.privateQMP, "the domain has no <name>, so its private QMP socket cannot be named",
                "give the domain a <name>, then run `geminus enroll DOMAIN --prepare`")
        }

        self.problems = problems
        self.facts = facts
    }

    // MARK: Private QMP socket and QEMU command-line arguments

    /// libvirt's namespace for <qemu:commandline>.
    public static let qemuNamespace = "http://libvirt.org/schemas/domain/qemu/1.0"
    /// Where QEMU creates the agent's private QMP sockets.
    public static let privateQMPDirectory = "/run/geminus/qmp"

    public static func privateQMPSocketPath(domain: String) -> String {
        "\(privateQMPDirectory)/\(domain).sock"
    }

    /// The arguments that give QEMU the agent's private QMP socket.
    public static func privateQMPArguments(domain: String) -> [String] {
        ["-qmp", "unix:\(privateQMPSocketPath(domain: domain)),server=on,wait=off"]
    }

    /// Creates the private QMP directory so QEMU, running as libvirt's unprivileged user, can
    /// create its socket there: owned by that user (libvirt-qemu on Debian) with mode 0750
    /// when the user exists, else world-writable and sticky (1733). The agent is root and
    /// connects either way. It must exist before the domain starts, or QEMU cannot bind the
    /// socket and the start fails; /run is a tmpfs, so the agent recreates it at its start.
    public static func ensurePrivateQMPDirectory(qemuUser: String = "libvirt-qemu") throws(GeminusError) {
        let parent = (privateQMPDirectory as NSString).deletingLastPathComponent
        for (dir, mode) in [(parent, mode_t(0o755)), (privateQMPDirectory, mode_t(0o750))] {
            if mkdir(dir, mode) != 0 && errno != EEXIST {
                throw GeminusError(.io, "cannot create \(dir): \(String(cString: strerror(errno)))", fix: "run as root")
            }
        }
        if let pw = getpwnam(qemuUser),
           chown(privateQMPDirectory, pw.pointee.pw_uid, pw.pointee.pw_gid) == 0, chmod(privateQMPDirectory, 0o750) == 0 {
            return
        }
        guard chmod(privateQMPDirectory, 0o1733) == 0 else {
            throw GeminusError(.io, "cannot set the permissions of \(privateQMPDirectory): \(String(cString: strerror(errno)))", fix: "run as root")
        }
    }

    /// The prefix the root binds to libvirt's QEMU namespace, if any.
    static func qemuPrefix(_ root: XMLElement) -> String? {
        (root.namespaces ?? []).first { $0.stringValue == qemuNamespace }?.name
    }

    /// The values of every <qemu:arg> in <qemu:commandline>, in order. (FoundationXML on Linux
    /// crashes on `localName` of unprefixed nodes: elements are matched by qualified name.)
    static func qemuCommandLineArguments(_ root: XMLElement) -> [String] {
        guard let prefix = qemuPrefix(root) else { return [] }
        return root.children("\(prefix):commandline").flatMap { cl in
            cl.children("\(prefix):arg").compactMap { $0.attr("value") }
        }
    }

    static func containsSequence(_ args: [String], _ wanted: [String]) -> Bool {
        guard !wanted.isEmpty, args.count >= wanted.count else { return wanted.isEmpty }
        return (0...(args.count - wanted.count)).contains { Array(args[$0..<($0 + wanted.count)]) == wanted }
    }

    /// `xml` with each argument group of `groups` in <qemu:commandline> (declaring the QEMU
    /// namespace and creating the element when missing). A group already present, in order,
    /// is not added again; other arguments stay.
    public static func addingQEMUArguments(_ xml: String, _ groups: [[String]]) throws -> String {
        let root = try parseDomain(xml)
        addQEMUArguments(root, groups)
        return root.xmlString(options: [.nodeCompactEmptyElement]) + "\n"
    }

    /// The <qemu:commandline> element (the last one), created with the namespace if missing.
    static func qemuCommandLine(_ root: XMLElement) -> (prefix: String, element: XMLElement) {
        let prefix: String
        if let p = qemuPrefix(root) {
            prefix = p
        } else {
            prefix = "qemu"
            root.addNamespace(XMLNode.namespace(withName: prefix, stringValue: qemuNamespace) as! XMLNode)
        }
        if let c = root.children("\(prefix):commandline").last { return (prefix, c) }
        let commandLine = XMLElement(name: "\(prefix):commandline")
        root.appendChild(commandLine)
        return (prefix, commandLine)
    }

    /// The value of `<qemu:env name=NAME>` in the domain XML, if set.
    public static func qemuEnvironment(_ name: String, inDomainXML xml: String) -> String? {
        guard let root = try? parseDomain(xml), let prefix = qemuPrefix(root) else { return nil }
        return root.children("\(prefix):commandline").flatMap { $0.children("\(prefix):env") }
            .last { $0.attr("name") == name }?.attr("value")
    }

    /// Sets `<qemu:env name=NAME value=VALUE/>` (replacing one of that name): QEMU starts with
    /// it in its environment. libvirt marks such a domain "tainted: custom-argv", as it does
    /// for the private QMP socket already.
    static func setQEMUEnvironment(_ root: XMLElement, name: String, value: String) {
        let (prefix, commandLine) = qemuCommandLine(root)
        for env in commandLine.children("\(prefix):env").reversed() where env.attr("name") == name {
            commandLine.removeChild(at: env.index)
        }
        commandLine.appendChild(XMLElement.empty("\(prefix):env", ["name": name, "value": value]))
    }

    static func addQEMUArguments(_ root: XMLElement, _ groups: [[String]]) {
        let (prefix, commandLine) = qemuCommandLine(root)
        for group in groups where !containsSequence(qemuCommandLineArguments(root), group) {
            for value in group {
                commandLine.appendChild(XMLElement.empty("\(prefix):arg", ["value": value]))
            }
        }
    }

    static func parseDomain(_ xml: String) throws -> XMLElement {
        let doc: XMLDocument
        do {
            doc = try parseXMLStrictly(xml)
        } catch {
            throw GeminusError(.invalidArgument, "the domain XML does not parse: \(error)", fix: "pass the output of `virsh dumpxml DOMAIN`")
        }
        guard let root = doc.rootElement(), root.name == "domain" else {
            throw GeminusError(.invalidArgument, "the XML's root element is not <domain>", fix: "pass the output of `virsh dumpxml DOMAIN`")
        }
        return root
    }

    // MARK: Prepare

    /// The domain XML with the memory backing (shared file; hugepages kept), the balloon
    /// (model none) and the agent's private QMP socket (<qemu:commandline>) fixed, everything else left as it was. Other problems remain for the
    /// operator: `CAEnrollmentCheck(xml:)` on the result lists them.
    ///
    /// With `writeTrackingLibrary` (the agent's preload library, at a path QEMU's user can
    /// read), QEMU is also started with it in LD_PRELOAD, so the agent can track guest writes
    /// instead of comparing all of RAM at each checkpoint.
    public static func prepare(_ xml: String, writeTrackingLibrary: String? = nil) throws -> String {
        let root = try parseDomain(xml)
        if let library = writeTrackingLibrary { setQEMUEnvironment(root, name: "LD_PRELOAD", value: library) }

        // <memoryBacking>: <source type='file'/> (unless hugepages and no source) and <access mode='shared'/>.
        let backing: XMLElement
        if let b = root.child("memoryBacking") {
            backing = b
        } else {
            backing = XMLElement(name: "memoryBacking")
            let after = root.child("currentMemory") ?? root.child("memory") ?? root.child("name")
            root.insert(backing, after: after)
        }
        let hugepages = backing.child("hugepages") != nil
        if let source = backing.child("source") {
            if source.attr("type") != "file" {
                if hugepages {
                    // Hugepages without a source are backed by a hugetlbfs file.
                    backing.removeChild(at: source.index)
                } else {
                    source.setAttr("type", "file")
                }
            }
        } else if !hugepages {
            backing.appendChild(XMLElement.empty("source", ["type": "file"]))
        }
        if let access = backing.child("access") {
            access.setAttr("mode", "shared")
        } else {
            backing.appendChild(XMLElement.empty("access", ["mode": "shared"]))
        }
        for cell in root.child("cpu")?.child("numa")?.children("cell") ?? [] where cell.attr("memAccess") == "private" {
            cell.setAttr("memAccess", "shared")
        }

        // Balloon: exactly <memballoon model='none'/> (its old children, address included, go).
        let devices: XMLElement
        if let d = root.child("devices") {
            devices = d
        } else {
            devices = XMLElement(name: "devices")
            root.addChild(devices)
        }
        let balloons = devices.children("memballoon")
        if balloons.isEmpty {
            devices.appendChild(XMLElement.empty("memballoon", ["model": "none"]))
        } else {
            for (n, b) in balloons.enumerated() {
                if n == 0 {
                    devices.replaceChild(at: b.index, with: XMLElement.empty("memballoon", ["model": "none"]))
                } else {
                    devices.removeChild(at: b.index)
                }
            }
        }

        // The agent's private QMP socket (needs the domain's name; other arguments stay).
        if let name = root.child("name")?.text, !name.isEmpty {
            addQEMUArguments(root, [privateQMPArguments(domain: name)])
        }
        return root.xmlString(options: [.nodeCompactEmptyElement]) + "\n"
    }

    /// `value` in `unit` (libvirt's units; KiB when absent) as KiB.
    static func kibibytes(_ value: String, unit: String?) -> UInt64? {
        guard let v = UInt64(value.trimmingCharacters(in: .whitespacesAndNewlines)) else { return nil }
        let bytes: UInt64
        switch (unit ?? "KiB").lowercased() {
        case "b", "bytes": bytes = 1
        case "kb": bytes = 1000
        case "k", "kib": bytes = 1 << 10
        case "mb": bytes = 1_000_000
        case "m", "mib": bytes = 1 << 20
        case "gb": bytes = 1_000_000_000
        case "g", "gib": bytes = 1 << 30
        case "tb": bytes = 1_000_000_000_000
        case "t", "tib": bytes = 1 << 40
        default: return nil
        }
        let (total, overflow) = v.multipliedReportingOverflow(by: bytes)
        return overflow ? nil : total / 1024
    }
}

// MARK: Small XML helpers (elements without namespace, as libvirt writes them)

extension XMLElement {
    func child(_ name: String) -> XMLElement? {
        children?.first { $0.kind == .element && $0.name == name } as? XMLElement
    }

    func children(_ name: String) -> [XMLElement] {
        (children ?? []).compactMap { $0.kind == .element && $0.name == name ? $0 as? XMLElement : nil }
    }

    func attr(_ name: String) -> String? {
        attribute(forName: name)?.stringValue
    }

    func setAttr(_ name: String, _ value: String) {
        if let a = attribute(forName: name) {
            a.stringValue = value
        } else {
            addAttribute(XMLNode.attribute(withName: name, stringValue: value) as! XMLNode)
        }
    }

    var text: String {
        (stringValue ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func empty(_ name: String, _ attributes: KeyValuePairs<String, String>) -> XMLElement {
        let e = XMLElement(name: name)
        for (k, v) in attributes { e.setAttr(k, v) }
        return e
    }

    /// Appends `child` after the last element child, keeping the indentation of its siblings.
    func appendChild(_ child: XMLElement) {
        let kids = children ?? []
        if let last = kids.last(where: { $0.kind == .element }) {
            insert(child, after: last as? XMLElement)
        } else {
            addChild(child)
        }
    }

    /// Inserts `child` right after `sibling` (or first), copying the whitespace before the
    /// sibling so the result keeps the document's indentation.
    func insert(_ child: XMLElement, after sibling: XMLElement?) {
        guard let sibling, sibling.parent === self else {
            place([child], at: 0)
            return
        }
        let i = sibling.index
        let kids = children ?? []
        if i > 0, kids[i - 1].kind == .text, let ws = kids[i - 1].stringValue,
           ws.allSatisfy({ $0.isWhitespace }) {
            place([XMLNode.text(withStringValue: ws) as! XMLNode, child], at: i + 1)
        } else {
            place([child], at: i + 1)
        }
    }

    /// FoundationXML traps when inserting at the end of (or into) an empty child list: append there.
    private func place(_ nodes: [XMLNode], at index: Int) {
        if index >= childCount {
            for n in nodes { addChild(n) }
        } else {
            insertChildren(nodes, at: index)
        }
    }
}

/// Parses XML strictly. FoundationXML on Linux recovers from malformed input (libxml2's
/// recover mode) and hands back a repaired document; so do XMLParser's return value and error.
/// A delegate that checks every end tag against its start tag catches what recovery hides.
func parseXMLStrictly(_ xml: String) throws -> XMLDocument {
    let data = Data(xml.utf8)
    let parser = XMLParser(data: data)
    let checker = WellFormednessChecker()
    parser.delegate = checker
    let ok = parser.parse()
    if let problem = checker.problem ?? (ok ? nil : parser.parserError.map { "\($0)" } ?? "malformed XML")
        ?? (checker.roots == 1 && checker.open.isEmpty ? nil : "unclosed or missing root element") {
        throw GeminusError(.invalidArgument, "the XML is not well-formed: \(problem)")
    }
    return try XMLDocument(data: data, options: [.nodePreserveWhitespace])
}

private final class WellFormednessChecker: NSObject, XMLParserDelegate {
    var open: [String] = []
    var roots = 0
    var problem: String?

    func parser(_ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?,
                qualifiedName qName: String?, attributes attributeDict: [String: String] = [:]) {
        if open.isEmpty { roots += 1 }
        open.append(elementName)
    }

    func parser(_ parser: XMLParser, didEndElement elementName: String, namespaceURI: String?, qualifiedName qName: String?) {
        guard let last = open.popLast() else {
            problem = problem ?? "</\(elementName)> without a start tag"
            return
        }
        if last != elementName {
            problem = problem ?? "<\(last)> closed by </\(elementName)> (line \(parser.lineNumber))"
        }
    }

    func parser(_ parser: XMLParser, parseErrorOccurred parseError: any Error) {
        problem = problem ?? "\(parseError) at line \(parser.lineNumber)"
    }
}
