import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// Geminus's record in a domain's `<metadata>`: which peer protects it, how often, and in what
/// state. Stored by libvirt in the domain's persistent configuration as
/// `<geminus:enrollment xmlns:geminus="https://geminus.dev/xmlns/ca/1" version="1"
///  peer="…" interval-ms="25" state="…"/>`, so it survives libvirtd and agent restarts and
/// shows in `virsh dumpxml`.
public struct GeminusEnrollment: Sendable, Equatable {
    public static let namespaceURI = "https://geminus.dev/xmlns/ca/1"
    public static let prefix = "geminus"
    public static let elementName = "enrollment"
    public static let version = 1

    /// Enrollment state as stored. Known values are the static members; a value written by a
    /// newer Geminus is kept as is.
    public struct State: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
        public var rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        public static let enrolled = State(rawValue: "enrolled")
        public static let synchronizing = State(rawValue: "synchronizing")
        public static let protected = State(rawValue: "protected")
        public static let unprotected = State(rawValue: "unprotected")
        public static let failedOver = State(rawValue: "failed-over")
        public var description: String { rawValue }
    }

    /// The secondary's address as the operator gave it (`host:port`).
    public var peer: String
    /// Checkpoint interval in milliseconds.
    public var intervalMilliseconds: Int
    public var state: State

    public init(peer: String, intervalMilliseconds: Int, state: State) {
        self.peer = peer
        self.intervalMilliseconds = intervalMilliseconds
        self.state = state
    }

    /// The element to hand to virDomainSetMetadata (libvirt puts it in our namespace).
    public var element: String {
        let e = XMLElement(name: GeminusEnrollment.elementName)
        e.setAttr("version", String(GeminusEnrollment.version))
        e.setAttr("peer", peer)
        e.setAttr("interval-ms", String(intervalMilliseconds))
        e.setAttr("state", state.rawValue)
        return e.xmlString(options: [.nodeCompactEmptyElement])
    }

    /// Parses the element virDomainGetMetadata returns (or one found in a domain's XML).
    public init(element xml: String) throws {
        let root: XMLElement
        do {
            let doc = try parseXMLStrictly(xml)
            guard let r = doc.rootElement() else { throw GeminusError(.invalidArgument, "empty") }
            root = r
        } catch {
            throw GeminusError(.invalidArgument, "the Geminus metadata of the domain does not parse: \(error)",
                               fix: "remove it with `geminus unenroll` (or `virsh metadata DOMAIN \(GeminusEnrollment.namespaceURI) --remove --config`) and enroll again")
        }
        try self.init(root: root)
    }

    init(root: XMLElement) throws {
        func bad(_ what: String) -> GeminusError {
            GeminusError(.invalidArgument, "the Geminus metadata of the domain is unusable: \(what)",
                         fix: "remove it with `geminus unenroll` (or `virsh metadata DOMAIN \(GeminusEnrollment.namespaceURI) --remove --config`) and enroll again")
        }
        guard (root.localName ?? root.name) == GeminusEnrollment.elementName else {
            throw bad("element <\(root.name ?? "?")> is not <\(GeminusEnrollment.elementName)>")
        }
        if let v = root.attr("version"), Int(v) != GeminusEnrollment.version {
            throw bad("version \(v) is not \(GeminusEnrollment.version) (written by another Geminus release)")
        }
        guard let peer = root.attr("peer"), !peer.isEmpty else { throw bad("no peer") }
        guard let ms = root.attr("interval-ms").flatMap({ Int($0) }), ms > 0 else {
            throw bad("interval-ms missing or not a positive integer")
        }
        guard let state = root.attr("state"), !state.isEmpty else { throw bad("no state") }
        self.init(peer: peer, intervalMilliseconds: ms, state: State(rawValue: state))
    }

    /// The enrollment recorded in a domain's XML (`<metadata>`), nil when there is none.
    public static func find(inDomainXML xml: String) throws -> GeminusEnrollment? {
        let doc = try parseXMLStrictly(xml)
        guard let md = doc.rootElement()?.child("metadata") else { return nil }
        for case let e as XMLElement in md.children ?? [] where e.uri == namespaceURI && e.localName == elementName {
            return try GeminusEnrollment(root: e)
        }
        return nil
    }
}

extension LibvirtConnection {
    /// Records `enrollment` in the domain's metadata (persistent configuration; the live
    /// definition too when the domain runs), replacing an earlier record.
    public func writeEnrollment(_ enrollment: GeminusEnrollment, of domain: LibvirtDomain, timeout: Double? = nil) throws {
        try setMetadata(domain, element: enrollment.element, prefix: GeminusEnrollment.prefix,
                        namespaceURI: GeminusEnrollment.namespaceURI, timeout: timeout)
    }

    /// The domain's enrollment record, nil when it is not enrolled.
    public func readEnrollment(of domain: LibvirtDomain, timeout: Double? = nil) throws -> GeminusEnrollment? {
        guard let xml = try metadata(domain, namespaceURI: GeminusEnrollment.namespaceURI, timeout: timeout) else { return nil }
        return try GeminusEnrollment(element: xml)
    }

    /// Removes the enrollment record (unenroll). Removing an absent record is not an error.
    public func removeEnrollment(of domain: LibvirtDomain, timeout: Double? = nil) throws {
        try setMetadata(domain, element: nil, prefix: GeminusEnrollment.prefix,
                        namespaceURI: GeminusEnrollment.namespaceURI, timeout: timeout)
    }
}
