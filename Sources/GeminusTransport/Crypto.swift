import CLibCrypto
import GeminusCore

/// The libcrypto primitives the transport needs, behind Swift signatures.
enum Crypto {
    static let macBytes = 32

    /// HMAC-SHA256 of the concatenation of `parts` (the handshake transcript).
    static func hmacSHA256(key: [UInt8], _ parts: [UInt8]...) -> [UInt8] {
        hmacSHA256(key: key, parts: parts)
    }

    static func hmacSHA256(key: [UInt8], parts: [[UInt8]]) -> [UInt8] {
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

    /// HKDF-SHA256 (RFC 5869) for one 32-byte output block: extract with `salt`, expand with
    /// `info`. Built on HMAC rather than libcrypto's KDF interface, whose API differs between
    /// OpenSSL 1.1 and 3; for a single block the whole RFC is these two lines.
    static func hkdfSHA256(secret: [UInt8], salt: [UInt8], info: [UInt8]) -> [UInt8] {
        let prk = hmacSHA256(key: salt, secret)
        return hmacSHA256(key: prk, info, [0x01])
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

/// AES-256-GCM for one direction of one connection, with the nonce taken from a frame counter
/// (docs/PROTOCOL.md, "Sealed frames").
///
/// The counter is never sent: both ends count the frames they seal and open, so a frame that
/// was dropped, replayed or reordered is opened under the wrong nonce and fails its tag like a
/// forged one. One key per direction keeps the two counters from ever sharing a nonce.
/// One thread at a time (the link's writer, or its reader).
final class AEADDirection: @unchecked Sendable {
    static let keyBytes = 32
    static let tagBytes = 16
    static let nonceBytes = 12

    private let context: OpaquePointer
    private let encrypting: Bool
    /// Frames sealed or opened so far: the next frame's nonce.
    private(set) var counter: UInt64 = 0

    init(key: [UInt8], encrypting: Bool) {
        precondition(key.count == Self.keyBytes, "AES-256-GCM takes a 32-byte key")
        guard let c = EVP_CIPHER_CTX_new() else { preconditionFailure("libcrypto could not allocate a cipher context") }
        context = c
        self.encrypting = encrypting
        let ok = key.withUnsafeBufferPointer { k in
            encrypting
                ? EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), nil, k.baseAddress, nil)
                : EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), nil, k.baseAddress, nil)
        }
        // A libcrypto without AES-256-GCM cannot run the protocol at all.
        precondition(ok == 1, "libcrypto AES-256-GCM initialisation failed")
    }

    deinit { EVP_CIPHER_CTX_free(context) }

    private func nextNonce() -> [UInt8] {
        // 2^64 frames would take centuries at line rate; the check keeps a nonce from ever repeating.
        precondition(counter < .max, "AES-GCM frame counter exhausted")
        var nonce = [UInt8](repeating: 0, count: Self.nonceBytes)
        withUnsafeBytes(of: counter.littleEndian) { c in for i in 0..<8 { nonce[4 + i] = c[i] } }
        counter += 1
        return nonce
    }

    /// Encrypts `text` in place, authenticating `associated` with it; writes the tag.
    func seal(associated: UnsafeRawBufferPointer, text: UnsafeMutableRawBufferPointer,
              tag: UnsafeMutableRawBufferPointer) {
        precondition(encrypting && tag.count == Self.tagBytes)
        let nonce = nextNonce()
        var n: Int32 = 0
        var ok = nonce.withUnsafeBufferPointer { EVP_EncryptInit_ex(context, nil, nil, nil, $0.baseAddress) }
        if associated.count > 0 {
            ok &= EVP_EncryptUpdate(context, nil, &n, associated.baseAddress?.assumingMemoryBound(to: UInt8.self), Int32(associated.count))
        }
        if text.count > 0 {
            let p = text.baseAddress!.assumingMemoryBound(to: UInt8.self)
            ok &= EVP_EncryptUpdate(context, p, &n, p, Int32(text.count))
        }
        var scratch = [UInt8](repeating: 0, count: 32)
        ok &= scratch.withUnsafeMutableBufferPointer { EVP_EncryptFinal_ex(context, $0.baseAddress, &n) }
        ok &= EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_GET_TAG, Int32(Self.tagBytes), tag.baseAddress)
        // Sealing cannot fail on valid arguments; sending an unsealed frame is never an option.
        precondition(ok == 1, "libcrypto AES-256-GCM sealing failed")
    }

    /// Decrypts `text` in place and checks the tag; false when the frame is not authentic
    /// (the decrypted bytes are then garbage and must be discarded).
    func open(associated: UnsafeRawBufferPointer, text: UnsafeMutableRawBufferPointer,
              tag: UnsafeRawBufferPointer) -> Bool {
        precondition(!encrypting && tag.count == Self.tagBytes)
        let nonce = nextNonce()
        var n: Int32 = 0
        var ok = nonce.withUnsafeBufferPointer { EVP_DecryptInit_ex(context, nil, nil, nil, $0.baseAddress) }
        if associated.count > 0 {
            ok &= EVP_DecryptUpdate(context, nil, &n, associated.baseAddress?.assumingMemoryBound(to: UInt8.self), Int32(associated.count))
        }
        if text.count > 0 {
            let p = text.baseAddress!.assumingMemoryBound(to: UInt8.self)
            ok &= EVP_DecryptUpdate(context, p, &n, p, Int32(text.count))
        }
        var tagCopy = Array(tag)
        ok &= tagCopy.withUnsafeMutableBytes { EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_SET_TAG, Int32(Self.tagBytes), $0.baseAddress) }
        var scratch = [UInt8](repeating: 0, count: 32)
        ok &= scratch.withUnsafeMutableBufferPointer { EVP_DecryptFinal_ex(context, $0.baseAddress, &n) }
        return ok == 1
    }
}
