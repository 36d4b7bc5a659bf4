import Foundation
import GeminusCore
import GeminusHypervisor
import GeminusLibvirt
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// The held NICs of an enrolled domain (`HeldInterfaces`): one `GuestNIC` per interface,
/// connected to the loopback port its QEMU listens on, tagged when there are several. The same
/// `GuestNIC` as a QEMU the agent starts: one NIC path for both.
enum LibvirtNICs {
    /// Connects to every held interface of `xml` (the running domain's live XML, or the XML a
    /// standby was started with).
    static func open(xml: String) throws(GeminusError) -> [GuestNIC] {
        let endpoints: [(interface: HeldInterface, port: Int)]
        do { endpoints = try HeldInterfaces.endpoints(inDomainXML: xml) } catch let e as GeminusError { throw e } catch {
            throw GeminusError(.invalidArgument, "the domain's interface record does not parse: \(error)")
        }
        return try endpoints.enumerated().map { (n, e) throws(GeminusError) in
            guard let mac = MACAddress(e.interface.mac) else {
                throw GeminusError(.invalidArgument, "interface MAC '\(e.interface.mac)' in the domain's record is not a MAC address")
            }
            return GuestNIC(connectingTo: HeldInterfaces.loopback, port: e.port, mac: mac, tag: NICTag.tag(index: n, of: endpoints.count))
        }
    }

    /// Waits for each NIC's connection to QEMU; the first that does not come is an error.
    static func awaitConnected(_ nics: [GuestNIC], domainName: String, timeout: Double) throws(GeminusError) {
        for nic in nics where !nic.waitConnected(timeout: timeout) {
            throw GeminusError(.hypervisor, "the NIC \(nic.mac) of domain '\(domainName)' does not answer on \(nic.endpoint) (QEMU's -netdev socket) within \(timeout) s",
                               fix: "QEMU takes one connection at a time: stop any other agent or program connected to \(nic.endpoint) (`ss -tnp | grep \(nic.endpoint)`)")
        }
    }

    /// Frames from the host's networks for the guest: untagged with one NIC, else behind the
    /// NIC's tag.
    static func inbound(_ nics: [GuestNIC]) -> (@Sendable ([UInt8]) -> Void)? {
        if nics.isEmpty { return nil }
        if nics.count == 1 && nics[0].tag == nil {
            let nic = nics[0]
            return { nic.deliver($0) }
        }
        return { frame in
            guard let tag = frame.first, let nic = nics.first(where: { $0.tag == tag }) else { return }
            nic.deliver(Array(frame.dropFirst()))
        }
    }

    /// A loopback TCP port nobody listens on now.
    static func freePort() -> Int? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = UInt32(0x7f000001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p in
                bind(fd, p, len) == 0 && getsockname(fd, p, &len) == 0
            }
        }
        return ok ? Int(UInt16(bigEndian: addr.sin_port)) : nil
    }
}
