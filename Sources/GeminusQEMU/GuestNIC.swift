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

/// How a QEMU guest's NIC is wired: an `ne2k_isa` whose backend is a unix stream socket
/// (`-netdev stream`, QEMU the client, each frame behind a 4-byte big-endian length) with the
/// agent listening at the other end.
///
/// Why a stream and not a datagram socket (`-netdev dgram`): a unix datagram socket takes ten
/// datagrams before the sender gets EAGAIN (net.unix.max_dgram_qlen), and QEMU 7.2's backend then
/// lost and reordered frames: measured here, a guest sending 4000 frames/s to a reader that
/// kept up delivered them out of order, and one that fell behind lost four in five. The
/// stream socket has megabytes of buffer and lost or reordered none (docs/NETWORK.md).
public struct NICSetup: Sendable, Equatable {
    public var mac: MACAddress
    /// The agent's listening socket (bound by `GuestNIC` before QEMU starts).
    public var socketPath: String

    public init(mac: MACAddress, socketPath: String) {
        self.mac = mac
        self.socketPath = socketPath
    }

    var qemuArguments: [String] {
        ["-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path=\(socketPath)",
         "-device", "ne2k_isa,netdev=n0,mac=\(mac)"]
    }
}

/// The guest side of a CA guest's network: every frame the guest's NIC transmits arrives here
/// and is offered to the output port (held until its checkpoint is acknowledged, then sent on
/// the host's network by the agent); frames from the network are handed to the guest at once
/// (`deliver`). Epochs as for the console (`DeviceOutputPump`).
///
/// One NIC path for every guest: a QEMU the agent starts connects to it over a unix socket
/// (`-netdev stream`, `init(_:)`); an enrolled libvirt domain's QEMU listens on loopback TCP
/// (`<interface type='server'>`, QEMU's `-netdev socket`) and this connects to it
/// (`init(connectingTo:port:mac:tag:)`). Both carry each frame behind a 4-byte big-endian length.
/// With a `tag` (a guest with several NICs) each frame offered to the port starts with that byte,
/// so the release knows which host network it goes to (`NICTag` in GeminusLibvirt); `deliver`
/// takes untagged frames.
///
/// Bounded, and never lossy on the way out: frames the full port refuses wait here (up to
/// `maxWaitingBytes`) and the socket keeps being read, because QEMU loses frames once its own
/// queue is full; meanwhile `isStalled` tells the agent to keep the guest paused after its next
/// checkpoint until acknowledgements make room (`PrimaryAgent`). Only past the cap does reading
/// stop, counted in `waitingCapHits`.
public final class GuestNIC: @unchecked Sendable {
    public static let maxWaitingBytes = 16 << 20
    /// A frame to the guest is dropped (as a full network queue would) when this much is
    /// already queued towards QEMU: the guest's receive ring is full and QEMU stopped reading.
    public static let maxQueuedTowardsGuest = 1 << 20
    /// The unix socket QEMU connects to (a QEMU the agent starts), nil when this connects to QEMU.
    public let setup: NICSetup?
    public let mac: MACAddress
    /// The first byte of each frame offered to the port (several NICs), nil for untagged frames.
    public let tag: UInt8?
    /// Where QEMU is reached: the unix socket's path or `HOST:PORT`.
    public let endpoint: String
    private let listener: Int32
    private let lock = NSLock()
    private let sendLock = NSLock()
    private var pump: DeviceOutputPump?
    private var port: (any GuestOutputPort)?
    private var connected: Int32 = -1
    private var closed = false
    private var _delivered = 0
    private var _deliveryDrops = 0
    private let stream = NICFrameStreamBox()

    /// Listens on the setup's socket (a stale file is replaced) before QEMU starts, and takes
    /// QEMU's connection when it comes.
    public init(_ setup: NICSetup, tag: UInt8? = nil) throws(GeminusError) {
        self.setup = setup
        mac = setup.mac
        self.tag = tag
        endpoint = setup.socketPath
        listener = try UnixSocket.listen(path: setup.socketPath, what: "the NIC socket")
        let t = Thread { [weak self] in self?.acceptQEMU() }
        t.name = "geminus-nic-accept"
        t.start()
    }

    /// Connects to a QEMU listening on `host:port` (`-netdev socket,listen=`), retrying every
    /// 50 ms until it answers or `stop`: a standby's QEMU may still be starting. QEMU takes one
    /// connection at a time and listens again when it closes.
    public init(connectingTo host: String, port: Int, mac: MACAddress, tag: UInt8? = nil) {
        setup = nil
        self.mac = mac
        self.tag = tag
        endpoint = "\(host):\(port)"
        listener = -1
        let t = Thread { [weak self] in self?.connectQEMU(host: host, port: port) }
        t.name = "geminus-nic-connect"
        t.start()
    }

    deinit {
        if listener >= 0 { close(listener) }
        if connected >= 0 && pump == nil { close(connected) }
    }

    /// QEMU's end is connected (frames flow).
    public var isConnected: Bool { lock.withLock { connected >= 0 && !closed } }

    /// Waits up to `timeout` seconds for QEMU's end; false if it did not come.
    public func waitConnected(timeout: Double) -> Bool {
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        while !isConnected {
            if Monotonic.nanos() >= deadline || lock.withLock({ closed }) { return false }
            Monotonic.sleep(nanos: 5_000_000)
        }
        return true
    }

    private func acceptQEMU() {
        if let fd = UnixSocket.accept(listener, keepWaiting: { !lock.withLock { closed } }) {
            take(fd)
        }
    }

    private func connectQEMU(host: String, port: Int) {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else { return }
        while !lock.withLock({ closed }) {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { return }
            let r = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if r == 0 {
                // Frames to the guest go at once, not when Nagle's algorithm has gathered more.
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                take(fd)
                return
            }
            close(fd)
            Monotonic.sleep(nanos: 50_000_000)
        }
    }

    private func take(_ fd: Int32) {
        var size: Int32 = 4 << 20
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        let pump = Self.makePump(fd, tag: tag, stream: stream)
        lock.withLock {
            if closed {
                pump.stop()
                return
            }
            connected = fd
            self.pump = pump
            if let port { pump.attach(port) }
        }
    }

    /// Reads the length-prefixed frames; stops reading (QEMU then queues) only past the cap.
    private static func makePump(_ fd: Int32, tag: UInt8?, stream: NICFrameStreamBox) -> DeviceOutputPump {
        var buffer = [UInt8](repeating: 0, count: 65536)
        return DeviceOutputPump(fd: fd, threadName: "geminus-nic-output", maxWaitingBytes: maxWaitingBytes, read: { fd in
            var frames: [[UInt8]] = []
            while frames.count < 256 {
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                guard n > 0 else { break }
                stream.withLock { $0.feed(buffer[0..<n], into: &frames) }
            }
            return frames
        }, offer: { port, frame in port.offerFrame(tag.map { [$0] + frame } ?? frame) })
    }

    /// What `geminus status` shows for this NIC.
    public var statusLine: String {
        let input = framesIn
        let oversize = stream.withLock { $0.oversizeFrames }
        return "\(mac) frames out \(framesOut), in \(input.delivered), in dropped \(input.dropped)\(oversize > 0 ? ", \(oversize) frames over \(NICFrameStream.maxFrameBytes) bytes dropped" : "")\(waitingCapHits > 0 ? ", reading stopped \(waitingCapHits) times at the \(GuestNIC.maxWaitingBytes >> 20) MiB cap" : "")\(isStalled ? ", STALLED on a full output buffer" : "")\(isConnected ? "" : ", NOT CONNECTED to QEMU (\(endpoint))")"
    }

    public var framesOut: Int { lock.withLock { pump?.unitsOffered ?? 0 } }
    /// Frames from the guest whose announced length was over `NICFrameStream.maxFrameBytes`:
    /// skipped unread, never buffered or released.
    public var oversizeFrames: Int { stream.withLock { $0.oversizeFrames } }
    /// Frames handed to the guest, and frames dropped on the way in (a network may drop a
    /// frame; the guest's protocols recover as from any loss).
    public var framesIn: (delivered: Int, dropped: Int) { lock.withLock { (_delivered, _deliveryDrops) } }
    /// Frames wait for room in the output port.
    public var isStalled: Bool { lock.withLock { pump?.isStalled ?? false } }
    public var waitingCapHits: Int { lock.withLock { pump?.waitingCapHits ?? 0 } }

    /// Where the guest's frames go from now on.
    public func attach(_ port: any GuestOutputPort) {
        lock.withLock {
            self.port = port
            pump?.attach(port)
        }
    }

    /// Takes every frame the guest sent so far. Call while it is paused, before the next epoch opens.
    public func drain() { lock.withLock { pump }?.drain() }

    /// A frame from the network for the guest: sent to QEMU now, never held (input needs no commit).
    /// Written under its own lock: a slow write must not hold up `drain` and `isStalled`, which
    /// the checkpoint pause waits on.
    public func deliver(_ frame: [UInt8]) {
        let fd: Int32? = lock.withLock { connected >= 0 && !closed ? connected : nil }
        let sent = fd.map { fd in sendLock.withLock { Self.writeWhole(frame, to: fd) } } ?? false
        lock.withLock { if sent { _delivered += 1 } else { _deliveryDrops += 1 } }
    }

    /// One length-prefixed frame, whole or not at all (a partial write would break the stream's
    /// framing); false when 1 MiB is already queued towards QEMU or the socket failed.
    private static func writeWhole(_ frame: [UInt8], to fd: Int32) -> Bool {
        var queued: Int32 = 0
        if ioctl(fd, UInt(TIOCOUTQ), &queued) == 0 && Int(queued) + frame.count + 4 > maxQueuedTowardsGuest { return false }
        let n = UInt32(frame.count)
        let bytes: [UInt8] = [UInt8(n >> 24), UInt8(truncatingIfNeeded: n >> 16), UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] + frame
        var off = 0
        while off < bytes.count {
            let w = bytes[off...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if w > 0 { off += w; continue }
            guard w < 0 && (errno == EAGAIN || errno == EINTR) else { return false }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, 10)
        }
        return true
    }

    public func stop() {
        let p: DeviceOutputPump? = lock.withLock {
            closed = true
            return pump
        }
        p?.stop()
        if listener >= 0 { shutdown(listener, Int32(SHUT_RDWR)) }
        if let setup { unlink(setup.socketPath) }
    }
}

/// The guest's side of the NIC socket as frames: each is a 4-byte big-endian length and that
/// many bytes. The length is the guest's (QEMU's) word, so it is judged before anything is
/// buffered: a frame announced over `maxFrameBytes` is skipped as it streams past, counted, and
/// the frames after it are read as usual.
public struct NICFrameStream: Sendable {
    /// The largest frame kept. Ethernet frames are at most 1518 bytes (1522 with one VLAN tag,
    /// 1526 with two), jumbo frames about 9216; 65535 is above all of them and is the most an
    /// emulated NIC hands QEMU's network layer in one frame (IP's 16-bit total length), so only
    /// a broken or hostile peer announces more.
    public static let maxFrameBytes = 65535

    private var pending: [UInt8] = []
    private var start = 0
    /// Bytes of an oversize frame still to be skipped.
    private var skipping = 0
    public private(set) var oversizeFrames = 0

    public init() {}

    /// Appends the whole frames `bytes` completes to `frames`.
    public mutating func feed(_ bytes: ArraySlice<UInt8>, into frames: inout [[UInt8]]) {
        var input = bytes
        if skipping > 0 {
            let n = min(skipping, input.count)
            skipping -= n
            input = input.dropFirst(n)
        }
        pending.append(contentsOf: input)
        while pending.count - start >= 4 {
            let len = Int(pending[start]) << 24 | Int(pending[start + 1]) << 16 | Int(pending[start + 2]) << 8 | Int(pending[start + 3])
            if len > Self.maxFrameBytes {
                oversizeFrames += 1
                let here = min(len, pending.count - start - 4)
                start += 4 + here
                skipping = len - here
                if skipping > 0 { break }
                continue
            }
            guard pending.count - start - 4 >= len else { break }
            frames.append(Array(pending[(start + 4)..<(start + 4 + len)]))
            start += 4 + len
        }
        if skipping > 0 || start == pending.count {
            // Everything buffered was used (or belongs to the frame being skipped).
            pending.removeAll(keepingCapacity: true)
            start = 0
        } else if start > 1 << 20 {
            pending.removeFirst(start)
            start = 0
        }
    }
}

/// The stream's state, shared by the reading thread and the status line.
final class NICFrameStreamBox: @unchecked Sendable {
    private let lock = NSLock()
    private var stream = NICFrameStream()
    func withLock<T>(_ body: (inout NICFrameStream) -> T) -> T { lock.withLock { body(&stream) } }
}
