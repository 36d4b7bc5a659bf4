import CGeminusSupport
import CXXHash

/// CRC32C over frames: cheap enough (hardware instruction) to check every byte on the wire.
public enum CRC32C {
    public static func checksum(_ data: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = data.baseAddress, data.count > 0 else { return crc }
        return geminus_crc32c(crc, base, data.count)
    }

    public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: crc) }
    }

    public static var isHardwareAccelerated: Bool { geminus_crc32c_is_hardware() != 0 }

    /// The plain table-driven computation, whatever the CPU: the reference the fast path is
    /// tested against.
    public static func referenceChecksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { geminus_crc32c_software(crc, $0.baseAddress, $0.count) }
    }
}

/// A 64-bit digest (XXH3) of a checkpoint's decoded contents. The primary computes it over the
/// pages it captured, the secondary over the pages it decoded; equal digests prove the delta
/// decoding (XOR against the peer's base, LZ4) reproduced exactly what was captured, which a
/// per-frame CRC alone cannot show.
public struct ContentDigest: ~Copyable {
    private let state: OpaquePointer

    public init() {
        state = XXH3_createState()!
        XXH3_64bits_reset(state)
    }

    deinit { XXH3_freeState(state) }

    public mutating func reset() { XXH3_64bits_reset(state) }

    public mutating func addPage(index: UInt64, contents: UnsafeRawPointer) {
        var le = index.littleEndian
        withUnsafeBytes(of: &le) { _ = XXH3_64bits_update(state, $0.baseAddress, 8) }
        XXH3_64bits_update(state, contents, GuestPage.size)
    }

    /// One disk write record: its offset (little-endian u64), then its data.
    public mutating func addDiskWrite(offset: UInt64, data: UnsafeRawBufferPointer) {
        var le = offset.littleEndian
        withUnsafeBytes(of: &le) { add($0) }
        add(data)
    }

    /// One zero write record: its offset and zeroed length (8 bytes LE each), then its flags
    /// (4 bytes LE, `DiskWrite.zeroesFlag`). Flipping a record's zero flag changes the digest.
    public mutating func addZeroWrite(offset: UInt64, length: UInt64) {
        var bytes = ByteWriter(capacity: 20)
        bytes.u64(offset)
        bytes.u64(length)
        bytes.u32(DiskWrite.zeroesFlag)
        bytes.bytes.withUnsafeBytes { add($0) }
    }

    /// A disk write as the secondary stages it (one record).
    public mutating func addDiskWrite(_ w: DiskWrite) {
        if w.isZeroes { addZeroWrite(offset: w.offset, length: w.length) } else { w.data.withUnsafeBytes { addDiskWrite(offset: w.offset, data: $0) } }
    }

    public mutating func add(_ data: UnsafeRawBufferPointer) {
        guard let base = data.baseAddress, data.count > 0 else { return }
        XXH3_64bits_update(state, base, data.count)
    }

    public var value: UInt64 { XXH3_64bits_digest(state) }

    /// The hash of one page alone (used by the compare-based dirty-page finder).
    public static func hashPage(_ contents: UnsafeRawPointer) -> UInt64 {
        XXH3_64bits(contents, GuestPage.size)
    }
}
