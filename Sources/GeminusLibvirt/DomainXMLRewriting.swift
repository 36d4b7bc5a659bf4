import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// Rewriting a domain's XML: what `geminus enroll --prepare` changes (memory backing, balloon,
/// the private QMP socket, the write-tracking library) and the <qemu:commandline> arguments and
/// environment a standby or the agent adds. Everything else in the XML is left as it was.
extension CAEnrollmentCheck {
    /// libvirt's namespace for <qemu:commandline>.
    public static let qemuNamespace = "http://libvirt.org/schemas/domain/qemu/1.0"

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
    ///
    /// Bridge and network interfaces move to the agent's socket (`holdInterfaces`,
    /// InterfaceRewriting.swift); their loopback ports skip `avoidingPorts` (ports other domains
    /// of this host use).
    public static func prepare(_ xml: String, writeTrackingLibrary: String? = nil, avoidingPorts: Set<Int> = []) throws -> String {
        let root = try parseDomain(xml)
        holdInterfaces(root, avoidingPorts: avoidingPorts)
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
            addQEMUArguments(root, [PrivateQMP.arguments(domain: name)])
        }
        return root.xmlString(options: [.nodeCompactEmptyElement]) + "\n"
    }
}
