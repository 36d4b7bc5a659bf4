#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GeminusCore

/// A man in the middle for the pair link, on loopback: it accepts the primary's connections,
/// dials the secondary for each, and passes frames both ways through a policy that may drop,
/// replay, reorder, alter or forge them. What an attacker who can inject into or relay the TCP
/// connection can do, so tests can show the agents refuse every such frame.
///
/// It parses only what travels in the clear (the 40-byte header: length, flags), exactly as an
/// attacker can; sealed payloads stay opaque to it.
public final class TamperingRelay: @unchecked Sendable {
    /// `toListener`: from the dialing agent (the primary) to the listening one.
    public enum Direction: Sendable, Hashable, CustomStringConvertible {
        case toListener, toDialer
        public var description: String { self == .toListener ? "primary->secondary" : "secondary->primary" }
    }

    /// One frame as it crossed the relay: its bytes, and the header fields anyone can read.
    public struct WireFrame: Sendable {
        public var bytes: [UInt8]
        public var kind: UInt8 { bytes[5] }
        public var flags: UInt16 { var r = ByteReader(bytes, offset: 6); return r.u16() ?? 0 }
        public var sealed: Bool { flags & FrameHeader.sealedFlag != 0 }
        public var generation: UInt64 { Self.u64(bytes, 16) }
        public var epoch: UInt64 { Self.u64(bytes, 24) }
        public var payloadLength: Int { Int(Self.u32(bytes, 8)) }

        static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { var r = ByteReader(b, offset: o); return r.u32() ?? 0 }
        static func u64(_ b: [UInt8], _ o: Int) -> UInt64 { var r = ByteReader(b, offset: o); return r.u64() ?? 0 }
    }

    /// What to put on the wire in place of the frame just read (in order; empty drops it).
    public typealias Policy = @Sendable (_ connection: Int, _ direction: Direction, _ frame: WireFrame) -> [[UInt8]]

    public let port: UInt16
    private let targetPort: UInt16
    private let policy: Policy
    private let listenFD: Int32
    private let lock = NSLock()
    private var stopped = false
    private var connections = 0
    private var sockets: [Int32] = []

    /// Listens on 127.0.0.1 (an ephemeral port) and relays to 127.0.0.1:`targetPort`.
    public init(targetPort: UInt16, policy: @escaping Policy) throws {
        self.targetPort = targetPort
        self.policy = policy
        let listenFD = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listenFD = listenFD
        var one: Int32 = 1
        setsockopt(listenFD, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: 0)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listenFD, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(listenFD, 8) == 0 else {
            close(listenFD)
            throw GeminusError(.connectionFailed, "relay could not listen on loopback: errno \(errno)")
        }
        var local = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listenFD, $0, &length) }
        }
        port = UInt16(bigEndian: local.sin_port)
        let t = Thread { [self] in acceptLoop() }
        t.name = "relay-accept"
        t.start()
    }

    /// Connections relayed so far (the primary redials after each one ends).
    public var connectionCount: Int { lock.withLock { connections } }

    public func stop() {
        let all: [Int32] = lock.withLock {
            stopped = true
            return sockets
        }
        Glibc.shutdown(listenFD, Int32(SHUT_RDWR))
        for fd in all { Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    deinit {
        stop()
        close(listenFD)
    }

    private static func loopback(port: UInt16) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        return addr
    }

    private func acceptLoop() {
        while true {
            let client = accept(listenFD, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = Self.loopback(port: targetPort)
            let ok = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            var one: Int32 = 1
            for fd in [client, server] { setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size)) }
            let index: Int? = lock.withLock {
                guard !stopped, ok == 0 else { return nil }
                sockets += [client, server]
                connections += 1
                return connections - 1
            }
            guard let index else {
                close(client)
                close(server)
                continue
            }
            let ends = PumpEnds(client: client, server: server)
            for (from, to, direction) in [(client, server, Direction.toListener), (server, client, Direction.toDialer)] {
                let t = Thread { [self] in
                    pump(from: from, to: to, direction: direction, connection: index)
                    ends.finished()
                }
                t.name = "relay-pump"
                t.start()
            }
        }
    }

    /// Closes both sockets once both directions have ended, and not before, so neither pump
    /// writes to a reused descriptor.
    private final class PumpEnds: @unchecked Sendable {
        let client: Int32
        let server: Int32
        private let lock = NSLock()
        private var remaining = 2
        init(client: Int32, server: Int32) { self.client = client; self.server = server }
        func finished() {
            Glibc.shutdown(client, Int32(SHUT_RDWR))
            Glibc.shutdown(server, Int32(SHUT_RDWR))
            let last = lock.withLock { remaining -= 1; return remaining == 0 }
            if last {
                close(client)
                close(server)
            }
        }
    }

    private func pump(from: Int32, to: Int32, direction: Direction, connection: Int) {
        while let frame = readFrame(from) {
            for bytes in policy(connection, direction, frame) {
                guard writeAll(to, bytes) else { return }
            }
        }
    }

    /// One frame as framed on the wire: header, payload, and the tag when the header says sealed.
    private func readFrame(_ fd: Int32) -> WireFrame? {
        guard var bytes = readExactly(fd, FrameHeader.size) else { return nil }
        let frame = WireFrame(bytes: bytes)
        // Not a frame we can follow (garbage): pass nothing more.
        guard frame.payloadLength <= FrameHeader.maxPayloadBytes else { return nil }
        let rest = frame.payloadLength + (frame.sealed ? FrameHeader.sealTagBytes : 0)
        guard let body = readExactly(fd, rest) else { return nil }
        bytes += body
        return WireFrame(bytes: bytes)
    }

    private func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var have = 0
        while have < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + have, count - have, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            have += n
        }
        return out
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            sent += n
        }
        return true
    }
}

/// Frames an attacker can make: valid headers (the CRCs are public), with a tag of random
/// bytes for a "sealed" one, since the keys are not theirs to know.
public enum ForgedFrame {
    /// A frame in the clear, exactly as protocol version 1 framed it (header and frame CRC valid).
    public static func clear(_ kind: FrameKind, generation: UInt64, epoch: UInt64, payload: [UInt8] = []) -> [UInt8] {
        FrameCodec.encode(FrameHeader(kind: kind, generation: Generation(generation), epoch: Epoch(epoch)), payload: payload)
    }

    /// A frame marked sealed, with a guessed tag.
    public static func sealed(_ kind: FrameKind, generation: UInt64, epoch: UInt64, payload: [UInt8] = []) -> [UInt8] {
        var bytes = clear(kind, generation: generation, epoch: epoch, payload: payload)
        bytes.withUnsafeMutableBytes { FrameCodec.markSealed(header: UnsafeMutableRawBufferPointer(rebasing: $0[0..<FrameHeader.size])) }
        return bytes + (0..<FrameHeader.sealTagBytes).map { _ in UInt8.random(in: 0...255) }
    }

    /// `frame` with one bit flipped at `offset` (counted from the frame's first byte).
    public static func flipped(_ frame: [UInt8], at offset: Int, bit: Int = 0) -> [UInt8] {
        var b = frame
        b[offset] ^= UInt8(1 << bit)
        return b
    }
}
