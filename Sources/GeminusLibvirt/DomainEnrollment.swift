import Foundation
import GeminusCore

/// `geminus enroll` and `geminus unenroll` against libvirt: a domain's persistent definition and
/// its check for CA, the changes `--prepare` makes (planned first, applied after the operator
/// agrees), and the enrolment record in the domain's metadata. The command asks and prints.
public final class DomainEnrollment {
    /// What `--prepare` changes in the persistent definition.
    public struct Preparation: Sendable {
        /// The definition after the change.
        public var xml: String
        /// The problems of the current definition the change fixes.
        public var fixes: [CAEnrollmentCheck.Problem]
        /// The write-tracking preload library QEMU starts with after the change, when the change adds it.
        public var addsWriteTracking: String?
        /// Interfaces the change moves to a socket the agent owns (held output), with where their
        /// frames are released.
        public var heldInterfaces: [HeldInterface]
    }

    public let connection: LibvirtConnection
    public let domain: LibvirtDomain
    /// The persistent definition, and its check (both read again by `apply`).
    public private(set) var xml: String
    public private(set) var check: CAEnrollmentCheck

    /// Opens `uri` and reads the persistent definition of the domain `name`.
    public let name: String

    public init(uri: String, domain name: String) throws {
        self.name = name
        connection = try LibvirtConnection.open(uri: uri)
        do {
            domain = try connection.lookupDomain(named: name)
            xml = try connection.xml(of: domain, .persistent)
        } catch {
            try? connection.close()
            throw error
        }
        check = CAEnrollmentCheck(xml: xml)
    }

    public func close() { try? connection.close() }

    /// The LD_PRELOAD QEMU starts with (the write-tracking library), nil when none.
    public var writeTrackingPreload: String? { CAEnrollmentCheck.qemuEnvironment("LD_PRELOAD", inDomainXML: xml) }

    /// What `--prepare` would change; nil when nothing needs to (the domain can be protected and
    /// QEMU already starts with `writeTrackingLibrary`, or there is none). Write tracking needs
    /// QEMU started with the agent's preload library; without it the agent compares all of RAM
    /// at every checkpoint (correct, but O(guest RAM)). Throws the check's error when the domain
    /// cannot be protected and the change would fix none of its problems.
    public func preparation(writeTrackingLibrary library: String?) throws -> Preparation? {
        let addsTracking = library != nil && writeTrackingPreload != library
        guard !check.canProtect || addsTracking else { return nil }
        let fixed = try CAEnrollmentCheck.prepare(xml, writeTrackingLibrary: library,
                                                  avoidingPorts: connection.heldInterfacePorts(except: name))
        let remaining = CAEnrollmentCheck(xml: fixed)
        let fixes = check.problems.filter { p in !remaining.problems.contains { $0.code == p.code } }
        guard !fixes.isEmpty || addsTracking else { throw check.error! }
        let held = (try? HeldInterfaces.find(inDomainXML: fixed))??.interfaces ?? []
        let before = Set(((try? HeldInterfaces.find(inDomainXML: xml))??.interfaces ?? []).map(\.mac))
        return Preparation(xml: fixed, fixes: fixes, addsWriteTracking: addsTracking ? library : nil,
                           heldInterfaces: held.filter { !before.contains($0.mac) })
    }

    /// Defines the prepared definition (it takes effect at the domain's next start) and reads it back.
    public func apply(_ preparation: Preparation) throws {
        _ = try connection.defineDomain(xml: preparation.xml)
        // QEMU creates the private QMP socket there at the domain's next start.
        if preparation.fixes.contains(where: { $0.code == .privateQMP }) { try? PrivateQMP.ensureDirectory() }
        xml = try connection.xml(of: domain, .persistent)
        check = CAEnrollmentCheck(xml: xml)
    }

    /// Records the enrolment (the peer as HOST:PORT, the checkpoint interval) in the domain's
    /// metadata. Throws the check's error when the domain cannot be protected.
    @discardableResult
    public func enroll(peer: String, intervalMilliseconds: Int) throws -> GeminusEnrollment {
        if let error = check.error { throw error }
        let enrollment = GeminusEnrollment(peer: peer, intervalMilliseconds: intervalMilliseconds, state: .enrolled)
        try connection.writeEnrollment(enrollment, of: domain)
        return enrollment
    }

    /// Removes the enrolment of the domain `name` (its definition is otherwise left as it is);
    /// refused when it has none.
    /// What `unenroll` did: interfaces put back as they were before `--prepare` (at the next
    /// start), recorded interfaces no longer in the definition, and whether an enrolment record
    /// was removed.
    public struct Removal: Sendable {
        public var restoredInterfaces: Int
        public var missingInterfaces: [String]
        public var removedEnrollment: Bool
    }

    @discardableResult
    public static func unenroll(uri: String, domain name: String) throws -> Removal {
        let conn = try LibvirtConnection.open(uri: uri)
        defer { try? conn.close() }
        let dom = try conn.lookupDomain(named: name)
        let enrolled = try conn.readEnrollment(of: dom) != nil
        // The held interfaces first: without the enrolment record the agent would not know them.
        // (`--prepare` records them even when the domain could not be enrolled yet.)
        let xml = try conn.xml(of: dom, .persistent)
        let hasHeld = try HeldInterfaces.find(inDomainXML: xml) != nil
        guard enrolled || hasHeld else {
            throw GeminusError(.invalidArgument, "domain '\(name)' is not enrolled; nothing to remove")
        }
        let restored = try CAEnrollmentCheck.restoringInterfaces(xml)
        if restored.restored > 0 || !restored.missing.isEmpty { _ = try conn.defineDomain(xml: restored.xml) }
        if enrolled { try conn.removeEnrollment(of: dom) }
        return Removal(restoredInterfaces: restored.restored, missingInterfaces: restored.missing, removedEnrollment: enrolled)
    }
}
