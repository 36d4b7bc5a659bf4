#if canImport(Glibc)
import Glibc
#endif
import GeminusCore
import GeminusHypervisor
import GeminusNode

/// Where released guest output goes: a UDP datagram per packet to the "network" (an observer
/// address in the demo and tests). Each datagram is prefixed with the generation of the primary
/// that released it, so an observer can tell the old primary's output from the new one's.
public final class OutputSink: @unchecked Sendable {
    private let fd: Int32
    private var address = sockaddr_in()
    public private(set) var packetsSent = 0

    public init(host: String, port: UInt16) throws(GeminusError) {
        fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw GeminusError(.io, "cannot create a UDP socket: \(String(cString: strerror(errno)))") }
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &address.sin_addr) == 1 else {
            close(fd)
            throw GeminusError(.invalidArgument, "output sink address '\(host)' is not an IPv4 address")
        }
    }

    deinit { close(fd) }

    public func send(_ packet: [UInt8], generation: Generation) {
        var w = ByteWriter(capacity: 8 + packet.count)
        w.u64(generation.rawValue)
        w.append(packet)
        let sent = w.bytes.withUnsafeBytes { buf in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, buf.baseAddress, buf.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        if sent >= 0 { packetsSent += 1 }
    }
}

/// The real destination of released output: console lines to the `OutputSink`, frames to the
/// host's network: one `HostNetwork` per guest NIC (`--nic-bridge`, or each held interface of an
/// enrolled libvirt domain). With several, each frame starts with its NIC's tag (`NICTag`) and
/// goes to the network of that tag; with one, frames are untagged.
public struct AgentOutputDestination: OutputDestination {
    public let sink: OutputSink?
    public let networks: [HostNetwork]

    public init(sink: OutputSink?, networks: [HostNetwork]) {
        self.sink = sink
        self.networks = networks
    }

    public func deliver(_ items: [GuestOutputItem], releasedThrough: Epoch?, generation: Generation) {
        for item in items {
            switch item {
            case .line(let p): sink?.send(p, generation: generation)
            case .frame(let f): transmit(f)
            }
        }
    }

    private func transmit(_ f: [UInt8]) {
        if networks.count == 1, networks[0].tag == nil {
            networks[0].transmit(f)
        } else if let tag = f.first, let n = networks.first(where: { $0.tag == tag }) {
            n.transmit(Array(f.dropFirst()))
        }
    }

    /// Frames from each network go to `deliver` (tagged when there are several), nil: dropped
    /// (this host's guest does not run).
    public func deliverInbound(to deliver: (@Sendable ([UInt8]) -> Void)?) {
        for n in networks { n.deliverInbound(to: deliver) }
    }

    /// Frames the guest made that were not its own (another source MAC, a bad length): dropped
    /// at release, never sent (HostNetwork.refusal).
    public var framesRefused: Int { networks.reduce(0) { $0 + $1.counters.refused } }

    public var frameCounters: (sent: Int, failures: Int) {
        networks.reduce((0, 0)) { acc, n in
            let c = n.counters
            return (acc.0 + c.sent, acc.1 + c.sendFailures)
        }
    }
}
