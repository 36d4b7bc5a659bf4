import Foundation
import GeminusAgent
import GeminusCore
import GeminusLibvirt
import GeminusQEMU
import Logging

extension Agent {
    /// The host networks of an enrolled libvirt domain's held interfaces (its record in the
    /// definition, written by `enroll --prepare`): one raw socket per interface on the bridge it
    /// was attached to (for a libvirt network, that network's bridge on this host), tagged when
    /// there are several. Empty for a domain without held interfaces.
    func openLibvirtNetworks(logger: Logger) throws -> [HostNetwork] {
        let connection = try openLibvirt()
        defer { try? connection.close() }
        let domain = try connection.lookupDomain(named: domainName)
        let held = try connection.heldInterfaceBridges(of: domain)
        var out: [HostNetwork] = []
        do {
            for (n, h) in held.enumerated() {
                guard let mac = MACAddress(h.interface.mac) else {
                    throw GeminusError(.invalidArgument, "interface MAC '\(h.interface.mac)' in the record of \(domainName) is not a MAC address")
                }
                out.append(try HostNetwork(interface: h.bridge, guestMAC: mac.bytes, tag: NICTag.tag(index: n, of: held.count)))
                logger.info("domain \(domainName)'s NIC \(mac) (\(h.interface.model ?? "default model"), \(h.interface.attachment)) released on \(h.bridge): frames leave once their checkpoint is acknowledged")
            }
        } catch {
            for n in out { n.stop() }
            throw error
        }
        return out
    }
}
