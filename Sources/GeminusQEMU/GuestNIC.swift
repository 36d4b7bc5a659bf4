import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// A 48-bit Ethernet address, written `52:54:00:12:34:56`.
public struct MACAddress: Sendable, Equatable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var b: [UInt8] = []
        for p in parts {
            guard p.count == 2, let v = UInt8(p, radix: 16) else { return nil }
            b.append(v)
        }
        bytes = b
    }

    public init(bytes: [UInt8]) {
        precondition(bytes.count == 6)
        self.bytes = bytes
    }

    /// A locally administered unicast address derived from `name` (the same name gives the same
    /// address on both hosts, as the resumed guest must keep its MAC).
    public static func derived(from name: String) -> MACAddress {
        var h: UInt64 = 0xcbf29ce484222325
        for c in name.utf8 { h = (h ^ UInt64(c)) &* 0x100000001b3 }
        return MACAddress(bytes: [0x52, 0x54, 0x00, UInt8(truncatingIfNeeded: h >> 16), UInt8(truncatingIfNeeded: h >> 8), UInt8(truncatingIfNeeded: h)])
    }

    public var description: String { bytes.map { String(format: "%02x", $0) }.joined(separator: ":") }
    public var isMulticast: Bool { bytes[0] & 1 != 0 }
}

/// How a QEMU guest's NIC is wired: an `ne2k_isa` whose backend is a unix datagram socket
/// (`-netdev dgram`), one datagram per Ethernet frame, with the agent at the other end.
public struct NICSetup: Sendable, Equatable {
    public var mac: MACAddress
    /// The agent's end (bound by `GuestNIC` before QEMU starts).
    public var agentSocketPath: String
    /// QEMU's end (bound by QEMU).
    public var qemuSocketPath: String

    public init(mac: MACAddress, agentSocketPath: String, qemuSocketPath: String) {
        self.mac = mac
        self.agentSocketPath = agentSocketPath
        self.qemuSocketPath = qemuSocketPath
    }

    var qemuArguments: [String] {
        ["-netdev", "dgram,id=n0,local.type=unix,local.path=\(qemuSocketPath),remote.type=unix,remote.path=\(agentSocketPath)",
         "-device", "ne2k_isa,netdev=n0,mac=\(mac)"]
    }
}

/// The guest side of a CA guest's network: every frame the guest's NIC transmits arrives here
/// and is offered to the output port (held until its checkpoint is acknowledged, then sent on
/// the host's network by the agent); frames from the network are handed to the guest at once
/// (`deliver`). Epochs and bounds as for the console (`DeviceOutputPump`). When the port is
/// full, reading stops and QEMU queues the NIC's frames itself.
public final class GuestNIC: @unchecked Sendable {
    public let setup: NICSetup
    private let pump: DeviceOutputPump
    private let fd: Int32
    private let qemuAddress: sockaddr_un
    private let counters = NSLock()
    private var _delivered = 0
    private var _deliveryDrops = 0

    /// Binds the agent's end of the socket (a stale file is replaced): before QEMU starts, so no
    /// frame of its first moments is sent to nowhere.
    public init(_ setup: NICSetup) throws(GeminusError) {
        self.setup = setup
        guard let local = Self.address(setup.agentSocketPath), let remote = Self.address(setup.qemuSocketPath) else {
            throw GeminusError(.invalidArgument, "NIC socket path too long (at most 107 bytes): \(setup.agentSocketPath) or \(setup.qemuSocketPath)",
                               fix: "use a shorter TMPDIR for the agent")
        }
        qemuAddress = remote
        let s = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw GeminusError(.resourceExhausted, "cannot create a unix datagram socket: \(String(cString: strerror(errno)))") }
        unlink(setup.agentSocketPath)
        var l = local
        let bound = withUnsafePointer(to: &l) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            let e = errno
            close(s)
            throw GeminusError(.io, "cannot bind the NIC socket \(setup.agentSocketPath): \(String(cString: strerror(e)))")
        }
        chmod(setup.agentSocketPath, 0o600)
        var size: Int32 = 4 << 20
        _ = setsockopt(s, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        _ = setsockopt(s, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        fd = s
        var buffer = [UInt8](repeating: 0, count: 65536)
        pump = DeviceOutputPump(fd: s, threadName: "geminus-nic-output", read: { fd in
            // A batch per call, so that a busy NIC cannot keep one drain going for ever.
            var frames: [[UInt8]] = []
            while frames.count < 64 {
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                guard n > 0 else { break }
                frames.append(Array(buffer[0..<n]))
            }
            return frames
        }, offer: { port, frame in port.offerFrame(frame) })
    }

    private static func address(_ path: String) -> sockaddr_un? {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: a.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &a.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return a
    }

    public var framesOut: Int { pump.unitsOffered }
    /// Frames handed to the guest, and frames QEMU's socket would not take (a network may drop
    /// a frame; the guest's protocols recover as from any loss).
    public var framesIn: (delivered: Int, dropped: Int) { counters.withLock { (_delivered, _deliveryDrops) } }
    /// Frames wait for room in the output port.
    public var isStalled: Bool { pump.isStalled }

    /// Where the guest's frames go from now on.
    public func attach(_ port: any GuestOutputPort) { pump.attach(port) }
    /// Takes every frame the guest sent so far. Call while it is paused, before the next epoch opens.
    public func drain() { pump.drain() }

    /// A frame from the network for the guest: sent to QEMU now, never held (input needs no commit).
    public func deliver(_ frame: [UInt8]) {
        var a = qemuAddress
        let n = frame.withUnsafeBytes { buf in
            withUnsafePointer(to: &a) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, buf.baseAddress, buf.count, Int32(MSG_DONTWAIT), $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
        }
        counters.withLock { if n == frame.count { _delivered += 1 } else { _deliveryDrops += 1 } }
    }

    public func stop() {
        pump.stop()
        unlink(setup.agentSocketPath)
    }
}
