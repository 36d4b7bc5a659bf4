import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCore

/// What `enroll --prepare` does to a domain's network interfaces, and what `unenroll` undoes:
/// each `<interface type='bridge'|'network'>` becomes `<interface type='server'>` with
/// `<source address='127.0.0.1' port=P/>` (QEMU `-netdev socket,listen=…`), keeping its `<mac>`,
/// `<model>`, `<address>` (PCI or ISA slot), `<boot>`, `<rom>`, `<link>` and `<driver>` (without
/// vhost and queues, which a socket backend has not); what only a tap backend takes goes
/// (`<target>`, `<virtualport>`, `<filterref>`, `<bandwidth>`, `<vlan>`, ...). The element as
/// it was is kept in the `HeldInterfaces` record, with where it was attached.
extension CAEnrollmentCheck {
    /// Children of `<interface>` that only a tap (bridge, network) backend takes.
    static let tapOnlyInterfaceChildren: Set<String> = [
        "source", "target", "virtualport", "filterref", "bandwidth", "vlan", "coalesce", "tune",
        "script", "ip", "route", "backenddomain", "mtu", "teaming", "portForward", "backend", "downscript",
    ]

    /// Moves every bridge and network interface not held yet to the agent's socket and records
    /// it. Interfaces of other types are left for the check to report.
    static func holdInterfaces(_ root: XMLElement, avoidingPorts: Set<Int>) {
        guard let devices = root.child("devices") else { return }
        let name = root.child("name")?.text ?? ""
        var record = ((try? HeldInterfaces.find(in: root)) ?? nil) ?? HeldInterfaces([])
        var used = avoidingPorts.union(record.interfaces.map(\.port))
        for i in devices.children("interface") {
            let type = i.attr("type")
            let source = i.child("source")
            let attachment: HeldInterface.Attachment
            if type == "bridge", let b = source?.attr("bridge"), !b.isEmpty {
                attachment = .bridge(b)
            } else if type == "network", let n = source?.attr("network"), !n.isEmpty {
                attachment = .network(n)
            } else {
                continue
            }
            let original = i.xmlString(options: [.nodeCompactEmptyElement])
            let index = record.interfaces.count
            let mac: String
            if let m = i.child("mac")?.attr("address"), !m.isEmpty {
                mac = m
            } else {
                // libvirt gives a defined interface a MAC; XML that has none gets one that stays.
                mac = derivedMAC(domain: name, index: index)
                i.insert(XMLElement.empty("mac", ["address": mac]), after: nil)
            }
            let port = HeldInterfaces.defaultPort(domain: name, index: index, avoiding: used)
            used.insert(port)
            for c in (i.children ?? []).reversed() where c.kind == .element && tapOnlyInterfaceChildren.contains(c.name ?? "") {
                i.removeChild(at: c.index)
            }
            if let driver = i.child("driver") {
                for a in ["name", "queues", "txmode", "ioeventfd"] where driver.attribute(forName: a) != nil {
                    driver.removeAttribute(forName: a)
                }
            }
            i.setAttr("type", "server")
            i.insert(XMLElement.empty("source", ["address": HeldInterfaces.loopback, "port": String(port)]), after: i.child("mac"))
            record.interfaces.append(HeldInterface(mac: mac, model: i.child("model")?.attr("type"), attachment: attachment,
                                                   port: port, original: original))
        }
        HeldInterfaces.store(record, in: root)
    }

    /// `xml` with each held interface's original `<interface>` element back (matched by MAC)
    /// and the record removed; unchanged when it has none. Also says how many were restored and
    /// the MACs recorded but no longer in the definition (left out).
    public static func restoringInterfaces(_ xml: String) throws -> (xml: String, restored: Int, missing: [String]) {
        let root = try parseDomain(xml)
        guard let record = try HeldInterfaces.find(in: root) else { return (xml, 0, []) }
        var restored = 0
        var missing: [String] = []
        let devices = root.child("devices")
        for held in record.interfaces {
            guard let devices,
                  let current = devices.children("interface").first(where: { ($0.child("mac")?.attr("address")?.lowercased()) == held.mac }) else {
                missing.append(held.mac)
                continue
            }
            let doc = try parseXMLStrictly(held.original)
            guard let original = doc.rootElement() else { missing.append(held.mac); continue }
            original.detach()
            devices.replaceChild(at: current.index, with: original)
            restored += 1
        }
        HeldInterfaces.store(nil, in: root)
        return (root.xmlString(options: [.nodeCompactEmptyElement]) + "\n", restored, missing)
    }

    /// A locally administered unicast MAC from the domain's name and the interface's index.
    static func derivedMAC(domain: String, index: Int) -> String {
        var h: UInt64 = 0xcbf29ce484222325
        for c in "\(domain)#\(index)".utf8 { h = (h ^ UInt64(c)) &* 0x100000001b3 }
        return String(format: "52:54:00:%02x:%02x:%02x", UInt8(truncatingIfNeeded: h >> 16), UInt8(truncatingIfNeeded: h >> 8), UInt8(truncatingIfNeeded: h))
    }
}
