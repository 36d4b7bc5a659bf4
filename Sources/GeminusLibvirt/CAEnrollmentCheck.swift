import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// Whether a libvirt domain can be protected in continuous-availability mode, judged from its
/// XML alone: every reason it cannot, each with exactly what to change, and the facts the
/// secondary must match.
///
/// Why these rules: the agent reads guest RAM from QEMU's shared RAM file and finds dirty pages
/// by write tracking (or compare). Pages discarded by a balloon, free-page reporting or
/// virtio-mem change without being reported; memory written by vhost-user back ends, vDPA or
/// VFIO devices bypasses QEMU's mapping; memory outside the main RAM file (DIMMs, ivshmem) is
/// not replicated at all.
///
/// Beside this file: the rules, one check each (CAEnrollmentRules.swift), the domain-XML
/// rewriting of `prepare` (DomainXMLRewriting.swift), the private QMP socket (PrivateQMP.swift),
/// the XML helpers and the strict parser.
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
        /// A macvtap (`<interface type='direct'>`) interface: its frames cannot be held.
        case directInterface = "direct-interface"
        /// An interface whose frames leave unheld: `enroll --prepare` moves a bridge or network
        /// interface to the agent's socket; other types cannot be held (docs/NETWORK.md).
        case unheldInterface = "unheld-interface"
        case sharedMemoryDevice = "shmem"
        /// A writable disk Geminus cannot replicate (network, shared, not raw or qcow2, a backing chain, or a second one: docs/DISKS.md).
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
                            fix: "`geminus enroll --prepare` fixes the memory backing, the balloon, the private QMP socket and moves bridge and network interfaces to the agent; the other changes are yours to make")
    }

    // MARK: Check (the rules: CAEnrollmentRules.swift)

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
}
