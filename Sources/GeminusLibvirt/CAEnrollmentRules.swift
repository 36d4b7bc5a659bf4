import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// The rules of `CAEnrollmentCheck`, one check each, run by `init(root:)` in this order (the
/// order problems are listed in). Each reports its problems through `add` with the problem's
/// code, what is wrong and exactly what to change.
extension CAEnrollmentCheck {
    typealias Report = (_ code: Code, _ message: String, _ fix: String) -> Void

    init(root: XMLElement) {
        var problems: [Problem] = []
        func add(_ code: Code, _ message: String, _ fix: String) {
            problems.append(Problem(code: code, message: message, fix: fix))
        }
        let facts = Facts(domain: root)
        let devices = root.child("devices")
        Self.checkDomainType(facts, add)
        Self.checkMemoryBacking(root, add)
        Self.checkBalloon(devices, add)
        Self.checkMemoryDevicesAndHotplug(root, devices, add)
        Self.checkInterfaces(root, devices, add)
        Self.checkDisks(devices, add)
        Self.checkVhostUserFilesystemsAndVideo(devices, add)
        Self.checkHostDevices(devices, add)
        Self.checkSharedMemory(devices, add)
        Self.checkPrivateQMP(root, facts, add)
        self.init(problems: problems, facts: facts)
    }

    /// Only QEMU domains.
    static func checkDomainType(_ facts: Facts, _ add: Report) {
        switch facts.domainType {
        case "qemu", "kvm": break
        case let t?:
            add(.domainType, "domain type '\(t)' is not QEMU", "Geminus protects only QEMU domains: <domain type='kvm'> (or type='qemu' for software emulation)")
        case nil:
            add(.domainType, "the <domain> element has no type", "set <domain type='kvm'> (or type='qemu' for software emulation)")
        }
    }

    /// Guest RAM in a shared file the agent can map.
    static func checkMemoryBacking(_ root: XMLElement, _ add: Report) {
        let backing = root.child("memoryBacking")
        let hugepages = backing?.child("hugepages") != nil
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
    }

    /// No balloon: libvirt adds a virtio balloon to x86 domains that name none.
    static func checkBalloon(_ devices: XMLElement?, _ add: Report) {
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
    }

    /// All guest memory in the main RAM file, and no memory hotplug.
    static func checkMemoryDevicesAndHotplug(_ root: XMLElement, _ devices: XMLElement?, _ add: Report) {
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
    }

    /// Network interfaces: none that writes guest RAM behind QEMU's back, and every one held
    /// (its frames leave only once their checkpoint is acknowledged, docs/NETWORK.md): a bridge
    /// or network interface until `enroll --prepare` moved its backend to the agent's socket.
    static func checkInterfaces(_ root: XMLElement, _ devices: XMLElement?, _ add: Report) {
        let record = (try? HeldInterfaces.find(in: root)) ?? nil
        let name = root.child("name")?.text ?? "DOMAIN"
        let prepare = "`geminus enroll \(name) --peer HOST --prepare`"
        for i in devices?.children("interface") ?? [] {
            let macText = i.child("mac")?.attr("address")
            let mac = macText.map { " \($0)" } ?? ""
            let type = i.attr("type") ?? "?"
            switch type {
            case "vhostuser":
                add(.vhostUser, "interface\(mac) is vhost-user: its back end writes guest RAM without going through QEMU, and sends its frames without the agent, so they cannot be held",
                    "use an interface of type 'network' or 'bridge' (QEMU virtio-net) instead of type 'vhostuser', then \(prepare)")
            case "vdpa":
                add(.vdpa, "interface\(mac) is vDPA: the device writes guest RAM by DMA and sends frames in hardware, where they cannot be held",
                    "use an interface of type 'network' or 'bridge' instead of type 'vdpa', then \(prepare)")
            case "hostdev":
                add(.hostdev, "interface\(mac) passes a host PCI function through (VFIO): it writes guest RAM by DMA, sends frames in hardware where they cannot be held, and does not exist on the secondary",
                    "use an interface of type 'network' or 'bridge' instead of type 'hostdev', then \(prepare)")
            case "direct":
                let dev = i.child("source")?.attr("dev").map { " \($0)" } ?? ""
                add(.directInterface, "interface\(mac) is macvtap on\(dev) (type 'direct'): its frames go from QEMU into the host NIC's macvtap queue, whose modes (vepa, private, passthrough) the agent's release on a bridge cannot reproduce, so they cannot be held",
                    "put the host NIC\(dev) in a Linux bridge and use <interface type='bridge'><source bridge='BRIDGE'/> (keep <mac> and <model>), then \(prepare)")
            case "bridge", "network":
                let source = i.child("source")
                let what = type == "bridge" ? source?.attr("bridge").map { "bridge \($0)" } : source?.attr("network").map { "network \($0)" }
                add(.unheldInterface, "interface\(mac) on \(what ?? type) sends its frames straight to the network, unheld: after a failover clients may have seen replies from a state the secondary never received",
                    "\(prepare) moves its backend to a socket the agent owns (model, MAC and PCI address stay) and records \(what ?? "its attachment") as where its frames are released")
            case "server" where macText.flatMap({ record?.interface(mac: $0) }) != nil:
                break
            default:
                add(.unheldInterface, "interface\(mac) of type '\(type)' is not one the agent can hold: only 'bridge' and 'network' interfaces are moved to the agent's socket by enrolment",
                    "attach it to a Linux bridge (<interface type='bridge'>) or a libvirt network (<interface type='network'>), then \(prepare)")
            }
        }
    }

    /// Disks: no vhost-user or vDPA back end; the writable ones replicable (a local raw or qcow2 image
    /// or block device, not shared), and at most one of them (the checkpoint stream carries one
    /// disk). One loop, so the problems keep the disks' order.
    static func checkDisks(_ devices: XMLElement?, _ add: Report) {
        var writable: [String] = []
        for (d, disk) in zip(devices?.children("disk") ?? [], DomainDisk.of(devices: devices)) {
            let target = d.child("target")?.attr("dev").map { " \($0)" } ?? ""
            switch d.attr("type") {
            case "vhostuser":
                add(.vhostUser, "disk\(target) is vhost-user: its back end writes guest RAM without going through QEMU",
                    "attach the storage as a file or block disk served by QEMU instead of type 'vhostuser'")
            case "vhostvdpa":
                add(.vdpa, "disk\(target) is vDPA: the device writes guest RAM by DMA",
                    "attach the storage as a file or block disk served by QEMU instead of type 'vhostvdpa'")
            default:
                guard disk.isWritable else { continue }
                // After a failover the standby must run on a disk that holds exactly the
                // committed epochs: only a disk whose every write the mirror sees, applied byte
                // for byte to the standby's own copy, gives that.
                if let why = disk.whyNotReplicable {
                    add(.unreplicatedDisk, why.message, why.fix)
                } else {
                    writable.append(disk.target)
                }
            }
        }
        if writable.count > 1 {
            add(.unreplicatedDisk, "\(writable.count) writable disks (\(writable.joined(separator: ", "))): Geminus replicates one writable disk per domain today",
                "keep one writable disk and make the others <readonly/>, or protect the VM with `geminus ha`")
        }
    }

    /// virtiofs and vhost-user video: back ends that write guest RAM without going through QEMU.
    static func checkVhostUserFilesystemsAndVideo(_ devices: XMLElement?, _ add: Report) {
        for f in devices?.children("filesystem") ?? [] where f.child("driver")?.attr("type") == "virtiofs" {
            let target = f.child("target")?.attr("dir").map { " '\($0)'" } ?? ""
            add(.vhostUser, "filesystem\(target) uses virtiofs, a vhost-user back end (virtiofsd) that writes guest RAM without going through QEMU",
                "remove the virtiofs <filesystem> and share the files over the network (NFS) instead")
        }
        for v in devices?.children("video") ?? [] where v.child("driver")?.attr("name") == "vhostuser" {
            add(.vhostUser, "video device uses a vhost-user back end that writes guest RAM without going through QEMU",
                "remove <driver name='vhostuser'/> from the <video> device")
        }
    }

    /// Host devices passed through: DMA into guest RAM, and absent on the secondary.
    static func checkHostDevices(_ devices: XMLElement?, _ add: Report) {
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
    }

    /// ivshmem: memory other processes write, not replicated.
    static func checkSharedMemory(_ devices: XMLElement?, _ add: Report) {
        if !(devices?.children("shmem") ?? []).isEmpty {
            add(.sharedMemoryDevice, "a <shmem> (ivshmem) device maps memory that other processes write and that is not replicated",
                "remove the <shmem> device")
        }
    }

    /// The agent's own QMP socket: stop/save/cont through libvirt's passthrough take ~20 ms
    /// a round trip, over a direct socket ~2 ms.
    static func checkPrivateQMP(_ root: XMLElement, _ facts: Facts, _ add: Report) {
        if let name = facts.name {
            let wanted = PrivateQMP.arguments(domain: name)
            if !CAEnrollmentCheck.containsSequence(CAEnrollmentCheck.qemuCommandLineArguments(root), wanted) {
                add(.privateQMP, "the domain has no private QMP socket for the agent (\(wanted.joined(separator: " ")) in <qemu:commandline>)",
                    "run `geminus enroll \(name) --prepare`, or add <qemu:arg value='\(wanted[0])'/><qemu:arg value='\(wanted[1])'/> to <qemu:commandline xmlns:qemu='\(CAEnrollmentCheck.qemuNamespace)'>")
            }
        } else {
            add(.privateQMP, "the domain has no <name>, so its private QMP socket cannot be named",
                "give the domain a <name>, then run `geminus enroll DOMAIN --prepare`")
        }
    }
}

extension CAEnrollmentCheck.Facts {
    /// The facts as the domain XML states them.
    init(domain root: XMLElement) {
        let os = root.child("os")
        let devices = root.child("devices")
        self.init(hugepages: root.child("memoryBacking")?.child("hugepages") != nil)
        name = root.child("name")?.text
        uuid = root.child("uuid")?.text
        domainType = root.attr("type")
        arch = os?.child("type")?.attr("arch")
        machineType = os?.child("type")?.attr("machine")
        emulator = devices?.child("emulator")?.text
        memoryKiB = root.child("memory").flatMap { CAEnrollmentCheck.kibibytes($0.text, unit: $0.attr("unit")) }
        vcpus = root.child("vcpu").flatMap { Int($0.text) }
    }
}

extension CAEnrollmentCheck {
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
