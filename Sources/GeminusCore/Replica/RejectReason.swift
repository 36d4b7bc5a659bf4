/// Why the secondary refused (part of) a checkpoint. Each is counted separately so an operator
/// can tell a flaky link (checksums) from a bug or an attack (digest, generation). Numbers are
/// on the wire inside `nack` frames.
public enum RejectReason: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    /// A frame failed its CRC32C.
    case corruptFrame = 1
    /// A frame of an epoch arrived out of order, twice, or after another epoch began.
    case outOfSequence = 2
    /// The epoch ended without all its frames, or another began before it ended (torn).
    case torn = 3
    /// The epoch is not newer than the last committed one (a duplicate or a replay).
    case stale = 4
    /// A delta names a base epoch other than the one committed here (a missed epoch).
    case baseMismatch = 5
    /// The frame's generation is older than the pair's: it comes from a deposed primary.
    case staleGeneration = 6
    /// A page record could not be decoded (bad length, bad LZ4, index out of range, duplicate).
    case badRecord = 7
    /// Decoded contents do not match the digest the primary computed.
    case digestMismatch = 8
    /// Page count, frame count or device-state size disagree with the epoch's end record.
    case countMismatch = 9
    /// The epoch describes a guest of a different size than the replica.
    case geometryMismatch = 10
    /// The epoch would need more staging memory than allowed.
    case tooLarge = 11
    /// Writing the replica disk failed here: the replica is not a whole VM until a full epoch.
    case diskFailure = 12

    public var description: String {
        switch self {
        case .corruptFrame: return "corrupt-frame"
        case .outOfSequence: return "out-of-sequence"
        case .torn: return "torn"
        case .stale: return "stale-epoch"
        case .baseMismatch: return "base-mismatch"
        case .staleGeneration: return "stale-generation"
        case .badRecord: return "bad-record"
        case .digestMismatch: return "digest-mismatch"
        case .countMismatch: return "count-mismatch"
        case .geometryMismatch: return "geometry-mismatch"
        case .tooLarge: return "too-large"
        case .diskFailure: return "disk-failure"
        }
    }
}
