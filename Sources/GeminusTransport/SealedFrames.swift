import GeminusCore

/// The two keys of one connection, one per direction (docs/PROTOCOL.md, "Sealed frames").
///
/// Derived with HKDF-SHA256 from the pair key, salted with both handshake nonces (fresh on
/// every connection, so no two connections share a key, and a recorded stream cannot be
/// replayed into a later one) and bound to both hellos (what each side said it is).
struct SessionKeys {
    static let clientToServerLabel = Array("geminus-v2 key client-to-server".utf8)
    static let serverToClientLabel = Array("geminus-v2 key server-to-client".utf8)

    var send: [UInt8]
    var receive: [UInt8]

    /// `isClient`: this side dialled (sends with the client-to-server key).
    static func derive(pairKey: [UInt8], nonceC: [UInt8], nonceS: [UInt8], helloC: [UInt8], helloS: [UInt8],
                       isClient: Bool) -> SessionKeys {
        func key(_ label: [UInt8]) -> [UInt8] {
            Crypto.hkdfSHA256(secret: pairKey, salt: nonceC + nonceS, info: label + helloC + helloS)
        }
        let c2s = key(clientToServerLabel)
        let s2c = key(serverToClientLabel)
        return isClient ? SessionKeys(send: c2s, receive: s2c) : SessionKeys(send: s2c, receive: c2s)
    }
}

enum FrameSeal {
    /// Seals one encoded frame (from `FrameCodec.encode`) in place and returns its tag, which
    /// goes on the wire right behind it. The header travels in the clear, authenticated.
    static func seal(_ frame: inout [UInt8], with direction: AEADDirection) -> [UInt8] {
        precondition(frame.count >= FrameHeader.size, "not an encoded frame")
        var tag = [UInt8](repeating: 0, count: FrameHeader.sealTagBytes)
        frame.withUnsafeMutableBytes { raw in
            let header = UnsafeMutableRawBufferPointer(rebasing: raw[0..<FrameHeader.size])
            FrameCodec.markSealed(header: header)
            tag.withUnsafeMutableBytes { t in
                direction.seal(associated: UnsafeRawBufferPointer(header),
                               text: UnsafeMutableRawBufferPointer(rebasing: raw[FrameHeader.size...]), tag: t)
            }
        }
        return tag
    }
}

/// What sealing costs one core, for `geminus bench`: AES-256-GCM over frames of `frameBytes`
/// in place, as the link's writer thread does it.
package enum SealingSpeed {
    package static func bytesPerSecond(frameBytes: Int, seconds: Double) -> Double {
        let direction = AEADDirection(key: [UInt8](repeating: 0x5A, count: AEADDirection.keyBytes), encrypting: true)
        var frame = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(1), epoch: Epoch(1)),
                                      payload: [UInt8](repeating: 0xA5, count: frameBytes))
        let start = Monotonic.nanos()
        let end = start + UInt64(seconds * 1e9)
        var bytes = 0
        while Monotonic.nanos() < end {
            _ = FrameSeal.seal(&frame, with: direction)
            bytes += frameBytes
        }
        return Double(bytes) / (Double(Monotonic.nanos() - start) / 1e9)
    }
}
