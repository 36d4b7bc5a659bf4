/// What a frame carries. The numbers are on the wire: never renumber, only add.
public enum FrameKind: UInt8, Sendable, CaseIterable {
    // Handshake (docs/PROTOCOL.md, "Handshake").
    case hello = 0x01
    case challenge = 0x02
    case auth = 0x03
    case accepted = 0x04
    case refused = 0x05
    // Checkpoint stream, primary to secondary.
    case epochBegin = 0x10
    case pages = 0x11
    case deviceState = 0x12
    case epochEnd = 0x13
    /// Disk writes of the epoch (`DiskWrite` records), after its device state.
    case diskWrites = 0x14
    // Secondary to primary.
    case ack = 0x20
    case nack = 0x21
    // Both ways.
    case heartbeat = 0x30
    // Planned switchover (docs/PROTOCOL.md, "Planned switchover").
    /// Primary to secondary: the guest is paused for good at `epoch`, which the secondary has
    /// acknowledged; resume it there.
    case handover = 0x40
    /// Secondary to primary: the guest runs here now, as `generation`, from `epoch`.
    case handoverDone = 0x41
    /// Secondary to primary: not taken over (payload: the reason, UTF-8); the primary resumes.
    case handoverDeclined = 0x42
    /// Primary to secondary: the primary stopped (an error, SIGTERM) and stopped its guest for good after `epoch`, which the secondary acknowledged; take over without waiting out a silence.
    case primaryStopped = 0x43
}

/// The fixed 40-byte header in front of every frame (docs/PROTOCOL.md, "Frame").
public struct FrameHeader: Equatable, Sendable {
    /// "GMNS" in ASCII, read as a little-endian u32.
    public static let magic: UInt32 = 0x534E_4D47
    /// 2: frames after the handshake are sealed (docs/PROTOCOL.md, "Sealed frames"). A peer
    /// of version 1 is refused, never served in the clear: no fallback, so no downgrade.
    public static let currentVersion: UInt8 = 2
    public static let size = 40
    /// `flags` bit 0: the payload is AES-256-GCM ciphertext followed by a 16-byte tag, and the
    /// frame CRC field is zero. Set on every frame after the handshake and on no other.
    public static let sealedFlag: UInt16 = 0x0001
    /// Bytes of the authentication tag behind a sealed frame's payload (not in `payloadLength`).
    public static let sealTagBytes = 16
    /// No frame payload is larger; a header claiming more is refused before anything is buffered.
    public static let maxPayloadBytes = 4 << 20

    public var version: UInt8
    public var kind: FrameKind
    public var flags: UInt16
    public var payloadLength: UInt32
    public var sequence: UInt32
    public var generation: Generation
    public var epoch: Epoch

    public init(kind: FrameKind, generation: Generation, epoch: Epoch, sequence: UInt32 = 0,
                payloadLength: UInt32 = 0, flags: UInt16 = 0, version: UInt8 = FrameHeader.currentVersion) {
        self.version = version
        self.kind = kind
        self.flags = flags
        self.payloadLength = payloadLength
        self.sequence = sequence
        self.generation = generation
        self.epoch = epoch
    }
}

/// One decoded, checksum-verified frame.
public struct Frame: Sendable {
    public var header: FrameHeader
    public var payload: [UInt8]

    public init(header: FrameHeader, payload: [UInt8]) {
        self.header = header
        self.payload = payload
    }

    public var kind: FrameKind { header.kind }
    public var epoch: Epoch { header.epoch }
    public var generation: Generation { header.generation }
}

/// Why bytes from a peer were not a frame. Every case is the peer's fault (or the network's),
/// never ours, so each is a value to report, not a trap.
public enum FrameError: Error, Equatable, Sendable, CustomStringConvertible {
    case badMagic(UInt32)
    case unsupportedVersion(UInt8)
    case unknownKind(UInt8)
    case payloadTooLarge(UInt32)
    case checksumMismatch(kind: UInt8, epoch: UInt64, sequence: UInt32)
    /// A sealed frame whose tag did not verify: forged, replayed, reordered, a frame before it
    /// dropped, or corrupted in transit. The header fields are the unverified claim.
    case unauthenticated(kind: UInt8, epoch: UInt64, sequence: UInt32)
    /// A frame in the clear after the handshake, or a sealed one during it.
    case sealingOutOfPlace(sealed: Bool)

    public var description: String {
        switch self {
        case .badMagic(let m):
            return "peer is not a Geminus agent (frame magic 0x\(String(m, radix: 16)), expected 0x\(String(FrameHeader.magic, radix: 16))); check the address and port"
        case .unsupportedVersion(let v):
            return "peer speaks Geminus protocol version \(v), this agent speaks version \(FrameHeader.currentVersion); run the same Geminus release on both hosts"
        case .unknownKind(let k):
            return "peer sent an unknown frame kind 0x\(String(k, radix: 16)); run the same Geminus release on both hosts"
        case .payloadTooLarge(let n):
            return "peer announced a \(n)-byte frame, over the \(FrameHeader.maxPayloadBytes)-byte limit"
        case .checksumMismatch(let k, let e, let s):
            return "frame kind 0x\(String(k, radix: 16)) of epoch \(e) (sequence \(s)) failed its CRC32C: corrupted in transit"
        case .unauthenticated(let k, let e, let s):
            return "a frame claiming kind 0x\(String(k, radix: 16)), epoch \(e), sequence \(s) failed authentication (AES-GCM tag): forged, replayed, reordered, dropped or corrupted on the way; the connection is ended and nothing in it was used"
        case .sealingOutOfPlace(let sealed):
            return sealed
                ? "peer sent a sealed frame during the handshake"
                : "peer sent a frame in the clear after the handshake (only sealed frames are accepted): forged or injected on the way"
        }
    }
}

public enum FrameCodec {
    /// Serialises a frame: header, then payload, with the CRC32C over both (CRC field as zero).
    public static func encode(_ header: FrameHeader, payload: UnsafeRawBufferPointer) -> [UInt8] {
        precondition(payload.count <= FrameHeader.maxPayloadBytes, "frame payload over the protocol limit")
        var h = header
        h.payloadLength = UInt32(payload.count)
        var out = [UInt8]()
        out.reserveCapacity(FrameHeader.size + payload.count)
        writeHeader(h, crc: 0, into: &out)
        // The header's own check, so a receiver can trust the length before it waits for the
        // payload (see parseHeader).
        let headerCRC = out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<32])) }
        withUnsafeBytes(of: headerCRC.littleEndian) { c in
            for i in 0..<4 { out[36 + i] = c[i] }
        }
        out.append(contentsOf: payload)
        let crc = CRC32C.checksum(out)
        withUnsafeBytes(of: crc.littleEndian) { c in
            for i in 0..<4 { out[32 + i] = c[i] }
        }
        return out
    }

    public static func encode(_ header: FrameHeader, payload: [UInt8] = []) -> [UInt8] {
        payload.withUnsafeBytes { encode(header, payload: $0) }
    }

    static func writeHeader(_ h: FrameHeader, crc: UInt32, into out: inout [UInt8]) {
        var w = ByteWriter(capacity: FrameHeader.size)
        w.u32(FrameHeader.magic)
        w.u8(h.version)
        w.u8(h.kind.rawValue)
        w.u16(h.flags)
        w.u32(h.payloadLength)
        w.u32(h.sequence)
        w.u64(h.generation.rawValue)
        w.u64(h.epoch.rawValue)
        w.u32(crc)
        w.u32(0)
        out.append(contentsOf: w.bytes)
    }

    /// Turns an encoded header into a sealed frame's header: sets `sealedFlag`, zeroes the frame
    /// CRC (the tag replaces it) and recomputes the header CRC, which covers the flags.
    public static func markSealed(header: UnsafeMutableRawBufferPointer) {
        precondition(header.count >= FrameHeader.size)
        let flags = UInt16(littleEndian: header.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) | FrameHeader.sealedFlag
        header.storeBytes(of: flags.littleEndian, toByteOffset: 6, as: UInt16.self)
        header.storeBytes(of: UInt32(0), toByteOffset: 32, as: UInt32.self)
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[0..<32]))
        header.storeBytes(of: crc.littleEndian, toByteOffset: 36, as: UInt32.self)
    }

    /// CRC32C of the 40 header bytes with the CRC field (bytes 32..<36) taken as zero: the
    /// start of a frame's checksum, which the receiver continues over the payload.
    public static func headerChecksum(_ header: UnsafeRawBufferPointer) -> UInt32 {
        precondition(header.count >= FrameHeader.size)
        let zero: [UInt8] = [0, 0, 0, 0]
        var crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[0..<32]))
        crc = zero.withUnsafeBytes { CRC32C.checksum($0, continuing: crc) }
        return CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[36..<40]), continuing: crc)
    }

    /// Parses the 40 header bytes; the version is checked before anything else is trusted so
    /// that a peer of another release gets a message about versions, not about checksums.
    public static func parseHeader(_ bytes: UnsafeRawBufferPointer) throws(FrameError) -> (FrameHeader, crc: UInt32) {
        precondition(bytes.count >= FrameHeader.size)
        func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
        func u64(_ o: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
        let magic = u32(0)
        guard magic == FrameHeader.magic else { throw .badMagic(magic) }
        let version = bytes[4]
        guard version == FrameHeader.currentVersion else { throw .unsupportedVersion(version) }
        // Checked before the length is believed: with only the frame CRC, a corrupted length
        // made the reader wait for a payload that never comes, swallowing every later frame
        // and heartbeat, until the peer's silence timeout fired (a false takeover, found by the
        // simulator: GeminusSimulationTests, scenario corrupt-length-is-caught-at-once).
        let headerCRC = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<32]))
        guard headerCRC == u32(36) else {
            throw .checksumMismatch(kind: bytes[5], epoch: u64(24), sequence: u32(12))
        }
        guard let kind = FrameKind(rawValue: bytes[5]) else { throw .unknownKind(bytes[5]) }
        let length = u32(8)
        guard length <= FrameHeader.maxPayloadBytes else { throw .payloadTooLarge(length) }
        let header = FrameHeader(kind: kind, generation: Generation(u64(16)), epoch: Epoch(u64(24)),
                                 sequence: u32(12), payloadLength: length,
                                 flags: UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 6, as: UInt16.self)),
                                 version: version)
        return (header, u32(32))
    }
}

/// Turns a byte stream into frames. Feed it whatever the socket returned; it hands out whole,
/// verified frames and keeps the rest. It never holds more than one frame's worth of bytes
/// beyond what was fed, so a slow reader cannot make it grow without bound.
public struct FrameDecoder {
    private var buffer: [UInt8] = []
    private var start = 0

    public init() {}

    public var bufferedBytes: Int { buffer.count - start }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        if start > 0 && start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    public mutating func feed(_ bytes: [UInt8]) { bytes.withUnsafeBytes { feed($0) } }

    /// The next whole frame, nil when more bytes are needed, or the reason the stream is bad.
    /// After an error the stream cannot be resynchronised; the connection must be dropped.
    public mutating func next() throws(FrameError) -> Frame? {
        // Judge the magic as soon as it is here, so a peer speaking something else (an HTTP
        // probe, a port scanner) is named at once rather than waited on for a whole header.
        if buffer.count - start >= 4 {
            let magic = buffer.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: start, as: UInt32.self)) }
            guard magic == FrameHeader.magic else { throw .badMagic(magic) }
        }
        guard buffer.count - start >= FrameHeader.size else { return nil }
        let parsed = buffer.withUnsafeBytes { raw in
            Result { () throws(FrameError) in
                try FrameCodec.parseHeader(UnsafeRawBufferPointer(rebasing: raw[start..<start + FrameHeader.size]))
            }
        }
        let (header, crc) = try parsed.get()
        let total = FrameHeader.size + Int(header.payloadLength)
        guard buffer.count - start >= total else { return nil }
        let computed = buffer.withUnsafeBytes { raw -> UInt32 in
            let crc = FrameCodec.headerChecksum(UnsafeRawBufferPointer(rebasing: raw[start..<start + FrameHeader.size]))
            return CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[start + FrameHeader.size..<start + total]), continuing: crc)
        }
        guard computed == crc else {
            throw .checksumMismatch(kind: header.kind.rawValue, epoch: header.epoch.rawValue, sequence: header.sequence)
        }
        let payload = Array(buffer[start + FrameHeader.size..<start + total])
        start += total
        // Compact once the consumed prefix dominates, keeping appends amortised O(1).
        if start > 1 << 20 && start * 2 > buffer.count {
            buffer.removeFirst(start)
            start = 0
        }
        return Frame(header: header, payload: payload)
    }
}
