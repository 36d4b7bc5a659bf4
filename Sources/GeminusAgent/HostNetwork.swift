import CGeminusSupport
import Foundation
import GeminusCore
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Where a guest NIC's released frames go, and where its incoming frames come from: the host's
/// network interface, through a raw socket (AF_PACKET), as a software bridge port for the guest.
/// Outgoing frames leave only when the output port releases them (output commit); incoming
/// frames for the guest's MAC (and broadcast and multicast) go to the guest at once.
///
/// Why a raw socket and not a tap device: no bridge to set up on the host, one socket, and the
/// guest's frames never enter the host's own stack; the cost is CAP_NET_RAW (docs/NETWORK.md).
public final class HostNetwork: @unchecked Sendable {
    public let interface: String
    public let guestMAC: [UInt8]
    /// The NIC's tag when the guest has several (the first byte of its frames in the output
    /// port and of those handed to the guest), nil for one NIC (`NICTag`).
    public let tag: UInt8?
    private let fd: Int32
    private let lock = NSLock()
    private var inbound: (@Sendable ([UInt8]) -> Void)?
    private var closed = false
    private var _sent = 0
    private var _sendFailures = 0
    private var _received = 0
    private var _refused = 0
    private var refusalLog = LogThrottle()
    private let logger = Logger(label: "geminus.network")

    public init(interface: String, guestMAC: [UInt8], tag: UInt8? = nil) throws(GeminusError) {
        precondition(guestMAC.count == 6)
        self.tag = tag
        self.interface = interface
        self.guestMAC = guestMAC
        let r = geminus_packet_open(interface)
        guard r >= 0 else {
            let e = -r
            switch e {
            case EPERM, EACCES:
                throw GeminusError(.io, "cannot open a raw socket on \(interface) for the guest's NIC: \(String(cString: strerror(e)))",
                                   fix: "run the agent as root or give it CAP_NET_RAW")
            case ENODEV, ENXIO:
                throw GeminusError(.invalidArgument, "no network interface '\(interface)' on this host (--nic-bridge)",
                                   fix: "name the interface the guest's traffic should use (ip link); for an enrolled libvirt domain, the bridge its interface was attached to (its enrolment record)")
            default:
                throw GeminusError(.io, "cannot open a raw socket on \(interface): \(String(cString: strerror(e)))")
            }
        }
        fd = r
        let t = Thread { [weak self] in self?.receiveLoop() }
        t.name = "geminus-host-network"
        t.start()
    }

    deinit { close(fd) }

    /// Incoming frames for the guest go to `deliver` from now on (nil: dropped, e.g. while this
    /// host's guest is a standby that does not run).
    /// With a `tag`, each frame reaches `deliver` behind that byte.
    public func deliverInbound(to deliver: (@Sendable ([UInt8]) -> Void)?) {
        let tagged: (@Sendable ([UInt8]) -> Void)?
        if let deliver, let tag { tagged = { deliver([tag] + $0) } } else { tagged = deliver }
        lock.withLock { inbound = tagged }
    }

    /// Sends one released frame on the interface. A send that fails (the interface is down, its
    /// queue full) is counted: the frame is lost as on any network, never sent early. A frame
    /// that is not the guest's own (`refusal`) is dropped, counted and logged, never sent.
    public func transmit(_ frame: [UInt8]) {
        if let why = Self.refusal(of: frame, guestMAC: guestMAC) {
            let repeats: Int? = lock.withLock {
                _refused += 1
                return refusalLog.admit(why, nowNanos: Monotonic.nanos())
            }
            if let repeats {
                logger.warning("dropped a frame from the guest's NIC on \(interface): \(why)\(repeats > 0 ? " (and \(repeats) more like it)" : ""); \(counters.refused) dropped so far")
            }
            return
        }
        let n = frame.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        lock.withLock { if n == frame.count { _sent += 1 } else { _sendFailures += 1 } }
    }

    /// The largest frame sent: 65535, as on the guest side (`NICFrameStream.maxFrameBytes`).
    public static let maxFrameBytes = 65535

    /// Why `frame` may not leave on the host's network, nil if it may. The guest NIC is a bridge
    /// port, so without this check the guest could send as any host on the LAN (a gratuitous
    /// ARP with the gateway's MAC); libvirt's equivalent is nwfilter's no-mac-spoofing.
    public static func refusal(of frame: [UInt8], guestMAC: [UInt8]) -> String? {
        guard frame.count >= 14 else { return "a frame of \(frame.count) bytes is shorter than an Ethernet header" }
        guard frame.count <= maxFrameBytes else { return "a frame of \(frame.count) bytes is over \(maxFrameBytes)" }
        guard frame[6..<12].elementsEqual(guestMAC) else {
            let source = frame[6..<12].map { String(format: "%02x", $0) }.joined(separator: ":")
            let own = guestMAC.map { String(format: "%02x", $0) }.joined(separator: ":")
            return "source MAC \(source) is not the guest's own \(own)"
        }
        return nil
    }

    public var counters: (sent: Int, sendFailures: Int, received: Int, refused: Int) {
        lock.withLock { (_sent, _sendFailures, _received, _refused) }
    }

    public func stop() {
        lock.withLock {
            closed = true
            inbound = nil
        }
        shutdown(fd, Int32(SHUT_RDWR))
    }

    private func receiveLoop() {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !lock.withLock({ closed }) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            while true {
                var outgoing: Int32 = 0
                let n = buffer.withUnsafeMutableBytes { geminus_packet_receive(fd, $0.baseAddress, $0.count, &outgoing) }
                guard n >= 14 else { break }
                guard outgoing == 0, isForGuest(buffer) else { continue }
                let frame = Array(buffer[0..<Int(n)])
                let deliver = lock.withLock { () -> (@Sendable ([UInt8]) -> Void)? in
                    _received += 1
                    return inbound
                }
                deliver?(frame)
            }
        }
    }

    /// To the guest's MAC, or broadcast/multicast, and not one of its own frames (another host
    /// may still carry them during a handover).
    private func isForGuest(_ f: [UInt8]) -> Bool {
        let fromGuest = f[6] == guestMAC[0] && f[7] == guestMAC[1] && f[8] == guestMAC[2]
            && f[9] == guestMAC[3] && f[10] == guestMAC[4] && f[11] == guestMAC[5]
        if fromGuest { return false }
        if f[0] & 1 != 0 { return true }
        return f[0] == guestMAC[0] && f[1] == guestMAC[1] && f[2] == guestMAC[2]
            && f[3] == guestMAC[3] && f[4] == guestMAC[4] && f[5] == guestMAC[5]
    }
}
