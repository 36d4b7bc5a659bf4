import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore
import CLibvirt

/// A network interface of an enrolled domain whose frames the agent holds until their
/// checkpoint is acknowledged (docs/NETWORK.md). `geminus enroll --prepare` moved its backend to
/// a loopback TCP socket QEMU listens on (`<interface type='server'>`, QEMU's `-netdev socket`:
/// each frame behind a 4-byte big-endian length, the framing of `-netdev stream`), which the
/// agent connects to (`GuestNIC`); the guest keeps its model, MAC and PCI address. Released
/// frames leave on the bridge the interface was attached to (a libvirt network: its bridge).
public struct HeldInterface: Sendable, Equatable {
    /// Where the interface was attached before enrolment: where its frames are released.
    public enum Attachment: Sendable, Equatable, CustomStringConvertible {
        /// `<interface type='bridge'><source bridge=NAME/>`
        case bridge(String)
        /// `<interface type='network'><source network=NAME/>`: released on that network's bridge.
        case network(String)

        public var description: String {
            switch self {
            case .bridge(let b): return "bridge \(b)"
            case .network(let n): return "network \(n)"
            }
        }
    }

    /// The guest's MAC (lower case), which identifies the interface in the live XML.
    public var mac: String
    /// The guest's NIC model (`<model type>`), nil when libvirt's default.
    public var model: String?
    public var attachment: Attachment
    /// The loopback TCP port QEMU listens on for the agent (the primary's; a standby picks a
    /// free one when it starts).
    public var port: Int
    /// The `<interface>` element as it was before enrolment, put back by `geminus unenroll`.
    public var original: String

    public init(mac: String, model: String?, attachment: Attachment, port: Int, original: String) {
        self.mac = mac.lowercased()
        self.model = model
        self.attachment = attachment
        self.port = port
        self.original = original
    }
}

/// The record of a domain's held interfaces, in its `<metadata>` beside the enrolment record:
/// `<geminus-nic:interfaces xmlns:geminus-nic="https://geminus.dev/xmlns/ca-interfaces/1"
/// version="1"><interface mac=… model=… bridge=…|network=… port=… original=…/>…`. Written by
/// `enroll --prepare` into the definition itself (so `virsh dumpxml --inactive` carries it to the
/// secondary's definition), read by the agents, removed by `unenroll` after it restored the
/// original elements. Its own namespace: libvirt keeps one metadata element per namespace, and
/// rewriting the enrolment record (peer, interval, state) must not lose it.
public struct HeldInterfaces: Sendable, Equatable {
    public static let namespaceURI = "https://geminus.dev/xmlns/ca-interfaces/1"
    public static let prefix = "geminus-nic"
    public static let elementName = "interfaces"
    public static let version = 1
    /// The loopback address QEMU listens on for the agent.
    public static let loopback = "127.0.0.1"

    /// In the order `prepare` found them; the index is the interface's tag when there are
    /// several (frames cross the output port tagged with it: `NICTag`).
    public var interfaces: [HeldInterface]

    public init(_ interfaces: [HeldInterface]) { self.interfaces = interfaces }

    public func interface(mac: String) -> HeldInterface? {
        interfaces.first { $0.mac == mac.lowercased() }
    }

    /// The element as it stands in `<metadata>` (prefixed, with its namespace declared).
    var qualifiedElement: XMLElement {
        let e = XMLElement(name: "\(Self.prefix):\(Self.elementName)")
        e.addNamespace(XMLNode.namespace(withName: Self.prefix, stringValue: Self.namespaceURI) as! XMLNode)
        e.setAttr("version", String(Self.version))
        for i in interfaces {
            let c = XMLElement(name: "\(Self.prefix):interface")
            c.setAttr("mac", i.mac)
            if let m = i.model { c.setAttr("model", m) }
            switch i.attachment {
            case .bridge(let b): c.setAttr("bridge", b)
            case .network(let n): c.setAttr("network", n)
            }
            c.setAttr("port", String(i.port))
            c.setAttr("original", i.original)
            e.addChild(c)
        }
        return e
    }

    /// Parses the record (prefixed or not, as libvirt returns it).
    init(root: XMLElement) throws {
        func bad(_ what: String) -> GeminusError {
            GeminusError(.invalidArgument, "the Geminus interface record of the domain is unusable: \(what)",
                         fix: "put the domain's original <interface> elements back by hand (`virsh edit`), remove the record (`virsh metadata DOMAIN \(HeldInterfaces.namespaceURI) --remove --config`) and run `geminus enroll --prepare` again")
        }
        if let v = root.attr("version"), Int(v) != Self.version {
            throw bad("version \(v) is not \(Self.version) (written by another Geminus release)")
        }
        var out: [HeldInterface] = []
        for case let c as XMLElement in root.children ?? [] where Self.isNamed(c, "interface") {
            guard let mac = c.attr("mac"), !mac.isEmpty else { throw bad("an interface without mac") }
            let attachment: HeldInterface.Attachment
            if let b = c.attr("bridge") { attachment = .bridge(b) }
            else if let n = c.attr("network") { attachment = .network(n) }
            else { throw bad("interface \(mac) names neither a bridge nor a network") }
            guard let port = c.attr("port").flatMap({ Int($0) }), (1...65535).contains(port) else { throw bad("interface \(mac) has no valid port") }
            guard let original = c.attr("original"), !original.isEmpty else { throw bad("interface \(mac) has no original element") }
            out.append(HeldInterface(mac: mac, model: c.attr("model"), attachment: attachment, port: port, original: original))
        }
        interfaces = out
    }

    static func isNamed(_ e: XMLElement, _ local: String) -> Bool {
        guard let n = e.name else { return false }
        return n == local || n.hasSuffix(":" + local)
    }

    /// The record's element in a domain root's `<metadata>`, if any.
    static func recordElement(in root: XMLElement) -> XMLElement? {
        guard let md = root.child("metadata") else { return nil }
        for case let e as XMLElement in md.children ?? [] where isNamed(e, elementName) {
            if e.uri == namespaceURI { return e }
            if (e.namespaces ?? []).contains(where: { $0.stringValue == namespaceURI }) { return e }
        }
        return nil
    }

    static func find(in root: XMLElement) throws -> HeldInterfaces? {
        try recordElement(in: root).map { try HeldInterfaces(root: $0) }
    }

    /// The record in a domain's XML, nil when the domain has none.
    public static func find(inDomainXML xml: String) throws -> HeldInterfaces? {
        try find(in: try CAEnrollmentCheck.parseDomain(xml))
    }

    /// Replaces (or with nil removes) the record in a domain root's `<metadata>`.
    static func store(_ record: HeldInterfaces?, in root: XMLElement) {
        if let old = recordElement(in: root), let md = old.parent as? XMLElement {
            md.removeChild(at: old.index)
        }
        guard let record, !record.interfaces.isEmpty else {
            if let md = root.child("metadata"), (md.children ?? []).allSatisfy({ $0.kind != .element }) {
                root.removeChild(at: md.index)
            }
            return
        }
        let md: XMLElement
        if let m = root.child("metadata") {
            md = m
        } else {
            md = XMLElement(name: "metadata")
            root.insert(md, after: root.child("description") ?? root.child("title") ?? root.child("uuid") ?? root.child("name"))
        }
        md.appendChild(record.qualifiedElement)
    }

    /// The loopback port the primary's QEMU listens on for interface `index` of `domain`: one
    /// block of 8 ports per domain in 47000-50999, chosen from the name so that two enrolled
    /// domains of one host rarely meet (a clash shows at the second one's start as QEMU's
    /// "Address already in use"); `enroll --prepare` skips ports in `avoiding`.
    public static func defaultPort(domain: String, index: Int, avoiding: Set<Int> = []) -> Int {
        var h: UInt64 = 0xcbf29ce484222325
        for c in domain.utf8 { h = (h ^ UInt64(c)) &* 0x100000001b3 }
        var p = 47000 + Int(h % 500) * 8 + index
        while avoiding.contains(p) { p = p >= 50999 ? 47000 : p + 1 }
        return p
    }
}

/// A frame's tag when a guest has several held NICs: the first byte of each frame crossing the
/// output port (and of each inbound frame handed to the guest) is the NIC's index in the record,
/// so one held queue keeps production order across NICs and the release finds the right bridge.
/// A guest with one NIC sends its frames untagged.
public enum NICTag {
    public static func tag(index: Int, of count: Int) -> UInt8? {
        count > 1 ? UInt8(index) : nil
    }
}

extension HeldInterfaces {
    /// Each recorded interface with the loopback port its `<interface type='server'>` in `xml`
    /// listens on (the live XML of a running domain, or a standby's XML), in record order.
    /// An interface recorded but absent from `xml` is an error: the agent would hold nothing.
    public static func endpoints(inDomainXML xml: String) throws -> [(interface: HeldInterface, port: Int)] {
        let root = try CAEnrollmentCheck.parseDomain(xml)
        guard let record = try find(in: root) else { return [] }
        let live = root.child("devices")?.children("interface") ?? []
        return try record.interfaces.map { held in
            guard let i = live.first(where: { $0.child("mac")?.attr("address")?.lowercased() == held.mac }),
                  i.attr("type") == "server", let port = i.child("source")?.attr("port").flatMap({ Int($0) }) else {
                throw GeminusError(.invalidArgument, "the domain's interface \(held.mac) is recorded as held but is not an <interface type='server'> with a port in its XML",
                                   fix: "run `geminus enroll DOMAIN --peer HOST --prepare` again and restart the domain")
            }
            return (held, port)
        }
    }

    /// `xml` with the port of every held interface replaced by `port(interface)`: a standby
    /// on a host that runs other domains (or, in tests, the primary itself) listens on a free one.
    public static func rebindingPorts(inDomainXML xml: String, _ port: (HeldInterface) -> Int) throws -> String {
        let root = try CAEnrollmentCheck.parseDomain(xml)
        guard let record = try find(in: root) else { return xml }
        for i in root.child("devices")?.children("interface") ?? [] where i.attr("type") == "server" {
            guard let mac = i.child("mac")?.attr("address"), let held = record.interface(mac: mac), let source = i.child("source") else { continue }
            source.setAttr("port", String(port(held)))
        }
        return root.xmlString(options: [.nodeCompactEmptyElement]) + "\n"
    }
}

extension LibvirtConnection {
    /// The Linux bridge of the libvirt network `name` (virNetworkGetBridgeName, as `virsh
    /// net-info` shows it): where a held interface attached to that network releases its frames.
    public func networkBridge(named name: String, timeout: Double? = nil) throws -> String {
        let uri = self.uri
        return try call("virNetworkGetBridgeName(\(name))", timeout: timeout) { conn -> String in
            guard let net = virNetworkLookupByName(conn.pointer, name) else {
                throw GeminusError(.invalidArgument, "no libvirt network named '\(name)' on \(uri)",
                                   fix: "define and start it on this host as on the primary (`virsh net-list --all`)")
            }
            defer { virNetworkFree(net) }
            guard let p = virNetworkGetBridgeName(net) else {
                throw LibvirtCall.lastError("libvirt network '\(name)' has no bridge (only bridged, NAT, routed and isolated networks have one)")
            }
            defer { free(p) }
            return String(cString: p)
        }
    }

    /// Where each held interface of `domain` releases its frames on this host: its bridge, or
    /// its libvirt network's bridge; in record order (empty when none is held). The record of
    /// the running domain when it runs (what its QEMU and the primary's NICs were started
    /// with, even if the definition changed since), else of its definition (what a standby
    /// starts from): the tags of the NICs and of the networks must agree.
    public func heldInterfaceBridges(of domain: LibvirtDomain, timeout: Double? = nil) throws -> [(interface: HeldInterface, bridge: String)] {
        let running = try isActive(domain, timeout: timeout)
        let xml = try self.xml(of: domain, running ? .live : .persistent, timeout: timeout)
        guard let record = try HeldInterfaces.find(inDomainXML: xml) else { return [] }
        return try record.interfaces.map { i in
            switch i.attachment {
            case .bridge(let b): return (i, b)
            case .network(let n): return (i, try networkBridge(named: n, timeout: timeout))
            }
        }
    }
}

extension LibvirtConnection {
    /// The loopback ports other domains of this connection hold for their interfaces (recorded
    /// or in their live XML), for `enroll --prepare` to skip. Domains that cannot be read are
    /// skipped: a clash still shows at start as QEMU's "Address already in use".
    public func heldInterfacePorts(except name: String, timeout: Double? = nil) -> Set<Int> {
        var ports: Set<Int> = []
        for summary in (try? listDomains(timeout: timeout)) ?? [] where summary.name != name {
            guard let d = try? lookupDomain(named: summary.name, timeout: timeout) else { continue }
            for kind in [LibvirtXMLKind.persistent, .live] {
                guard let xml = try? self.xml(of: d, kind, timeout: timeout), let root = try? CAEnrollmentCheck.parseDomain(xml) else { continue }
                for i in root.child("devices")?.children("interface") ?? [] where i.attr("type") == "server" {
                    if let p = i.child("source")?.attr("port").flatMap({ Int($0) }) { ports.insert(p) }
                }
            }
        }
        return ports
    }
}
