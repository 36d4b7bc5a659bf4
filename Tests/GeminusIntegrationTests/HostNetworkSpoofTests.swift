import Foundation
import Testing
import GeminusAgent

/// Review finding M8: the guest's NIC is a port on the host's LAN, so a released frame leaves
/// only with the guest's own source MAC; any other (a gratuitous ARP claiming the gateway's
/// MAC) is dropped and counted, never sent.
@Suite struct HostNetworkSpoofTests {
    static let guest: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
    static let gateway: [UInt8] = [0x00, 0x11, 0x22, 0x33, 0x44, 0x55]

    /// A gratuitous ARP reply from `source` claiming 10.0.0.1.
    static func arp(from source: [UInt8]) -> [UInt8] {
        let broadcast = [UInt8](repeating: 0xFF, count: 6)
        return broadcast + source + [0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2] + source + [10, 0, 0, 1] + broadcast + [10, 0, 0, 1]
    }

    @Test func onlyTheGuestsOwnFramesMayLeave() {
        #expect(HostNetwork.refusal(of: Self.arp(from: Self.guest), guestMAC: Self.guest) == nil)
        #expect(HostNetwork.refusal(of: Self.arp(from: Self.gateway), guestMAC: Self.guest)?.contains("00:11:22:33:44:55") == true)
        #expect(HostNetwork.refusal(of: Array(Self.arp(from: Self.guest).prefix(13)), guestMAC: Self.guest) != nil)
        #expect(HostNetwork.refusal(of: Self.arp(from: Self.guest) + [UInt8](repeating: 0, count: 70_000), guestMAC: Self.guest) != nil)
    }

    /// Through a real raw socket on loopback (needs CAP_NET_RAW): the spoofed frame is not sent.
    @Test(.enabled(if: getuid() == 0, "needs CAP_NET_RAW"))
    func aSpoofedFrameIsCountedNotSent() throws {
        let network = try HostNetwork(interface: "lo", guestMAC: Self.guest)
        defer { network.stop() }
        let destination = AgentOutputDestination(sink: nil, networks: [network])
        destination.deliver([.frame(Self.arp(from: Self.gateway)), .frame(Self.arp(from: Self.guest))], releasedThrough: nil, generation: .init(1))
        #expect(network.counters.sent == 1, "the gateway's ARP was sent")
        #expect(network.counters.refused == 1 && destination.framesRefused == 1)
    }
}
