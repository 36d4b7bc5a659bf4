import CLibCrypto
import GeminusCore

/// The three libcrypto primitives the transport needs, behind Swift signatures.
enum Crypto {
    static let macBytes = 32

    /// HMAC-SHA256 of the concatenation of `parts` (the handshake transcript).
    static func hmacSHA256(key: [UInt8], _ parts: [UInt8]...) -> [UInt8] {
        var message: [UInt8] = []
        message.reserveCapacity(parts.reduce(0) { $0 + $1.count })
        for p in parts { message.append(contentsOf: p) }
        var out = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        let ok = key.withUnsafeBytes { k in
            message.withUnsafeBytes { m in
                out.withUnsafeMutableBufferPointer { o in
                    HMAC(EVP_sha256(), k.baseAddress, Int32(k.count),
                         m.baseAddress?.assumingMemoryBound(to: UInt8.self), m.count, o.baseAddress, &length)
                }
            }
        }
        // HMAC only fails on allocation failure or a broken libcrypto; continuing would mean
        // authenticating with garbage.
        precondition(ok != nil && Int(length) == macBytes, "libcrypto HMAC-SHA256 failed")
        return Array(out.prefix(macBytes))
    }

    /// Compares in time independent of where the inputs differ, so that a peer cannot learn
    /// the expected MAC byte by byte from response timing.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        return a.withUnsafeBytes { x in
            b.withUnsafeBytes { y in
                CRYPTO_memcmp(x.baseAddress, y.baseAddress, x.count) == 0
            }
        }
    }

    static func randomBytes(_ count: Int) throws(GeminusError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let ok = out.withUnsafeMutableBufferPointer { RAND_bytes($0.baseAddress, Int32(count)) }
        guard ok == 1 else {
            throw GeminusError(.internalInvariant, "the system random number generator failed (libcrypto RAND_bytes)")
        }
        return out
    }
}
