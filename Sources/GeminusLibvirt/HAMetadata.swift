import CLibvirt
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// The HA path's record in a domain's `<metadata>`:
/// `<geminus-ha:ha xmlns:geminus-ha="https://geminus.dev/xmlns/ha/1" version="1" priority="0"/>`.
/// Kept in the persistent configuration, so it travels with the definition a surviving node
/// starts the VM from, and shows in `virsh dumpxml`.
public struct GeminusHAMetadata: Sendable, Equatable {
    public static let namespaceURI = "https://geminus.dev/xmlns/ha/1"
    public static let prefix = "geminus-ha"
    public static let elementName = "ha"

    /// Higher restarts first after a node failure; equal priorities go biggest first.
    public var priority: Int

    public init(priority: Int) {
        self.priority = priority
    }

    public var element: String {
        let e = XMLElement(name: GeminusHAMetadata.elementName)
        e.addAttribute(XMLNode.attribute(withName: "version", stringValue: "1") as! XMLNode)
        e.addAttribute(XMLNode.attribute(withName: "priority", stringValue: String(priority)) as! XMLNode)
        return e.xmlString(options: [.nodeCompactEmptyElement])
    }

    public init(element xml: String) throws {
        let fix = "remove it with `geminus ha remove DOMAIN` (or `virsh metadata DOMAIN \(GeminusHAMetadata.namespaceURI) --remove --config`) and add it again"
        guard let root = (try? XMLDocument(xmlString: xml, options: []))?.rootElement(),
              (root.localName ?? root.name) == GeminusHAMetadata.elementName else {
            throw GeminusError(.invalidArgument, "the HA metadata of the domain does not parse", fix: fix)
        }
        guard let p = root.attribute(forName: "priority")?.stringValue.flatMap({ Int($0) }) else {
            throw GeminusError(.invalidArgument, "the HA metadata of the domain has no integer priority", fix: fix)
        }
        self.init(priority: p)
    }
}

/// A running domain as the HA agent sees it.
public struct LibvirtDomainSummary: Sendable, Equatable {
    public var name: String
    public var memoryMiB: Int
    public var active: Bool
}

extension LibvirtConnection {
    public func writeHA(_ ha: GeminusHAMetadata, of domain: LibvirtDomain, timeout: Double? = nil) throws {
        try setMetadata(domain, element: ha.element, prefix: GeminusHAMetadata.prefix, namespaceURI: GeminusHAMetadata.namespaceURI, timeout: timeout)
    }

    public func readHA(of domain: LibvirtDomain, timeout: Double? = nil) throws -> GeminusHAMetadata? {
        guard let xml = try metadata(domain, namespaceURI: GeminusHAMetadata.namespaceURI, timeout: timeout) else { return nil }
        return try GeminusHAMetadata(element: xml)
    }

    public func removeHA(of domain: LibvirtDomain, timeout: Double? = nil) throws {
        try setMetadata(domain, element: nil, prefix: GeminusHAMetadata.prefix, namespaceURI: GeminusHAMetadata.namespaceURI, timeout: timeout)
    }

    /// Every domain (defined or running) with its memory and whether it runs: one RPC for the
    /// list, one per domain for its info.
    public func listDomains(timeout: Double? = nil) throws -> [LibvirtDomainSummary] {
        let uri = self.uri
        return try call("virConnectListAllDomains", timeout: timeout) { conn in
            var list: UnsafeMutablePointer<virDomainPtr?>?
            let n = virConnectListAllDomains(conn.pointer, &list, 0)
            guard n >= 0, let list else { throw LibvirtCall.lastError("cannot list the domains on \(uri)") }
            defer { free(list) }
            var out: [LibvirtDomainSummary] = []
            for i in 0..<Int(n) {
                guard let d = list[i] else { continue }
                defer { virDomainFree(d) }
                var info = virDomainInfo()
                guard virDomainGetInfo(d, &info) == 0, let name = virDomainGetName(d) else { continue }
                let active = virDomainIsActive(d) == 1
                out.append(LibvirtDomainSummary(name: String(cString: name), memoryMiB: Int(info.maxMem / 1024), active: active))
            }
            return out
        }
    }
}
