import GeminusCore

/// Mutual challenge-response over the pair key (docs/PROTOCOL.md, "Handshake").
///
/// Both sides contribute a fresh nonce, and each MAC covers both nonces and both hellos, so a
/// recorded handshake cannot be replayed and neither hello can be altered in flight. The two
/// MACs use different labels so the secondary's answer can never be reflected back as the
/// primary's proof. On success both sides derive the connection's two frame keys from the
/// same transcript (`SessionKeys`), so every later frame is bound to this handshake.
/// Neither side keeps the socket on failure: the caller releases it.
enum Handshake {
    static let nonceBytes = 32
    static let clientLabel = Array("geminus-v2 client".utf8)
    static let serverLabel = Array("geminus-v2 server".utf8)
    static let maxReasonBytes = 1024
    /// A `refused` reason is shown to the operator at most this long: it is unauthenticated.
    static let maxShownReasonCharacters = 200

    /// First byte of a `refused` payload; the UTF-8 reason follows.
    enum Refusal: UInt8 {
        case authenticationFailed = 1
        case notAdmitted = 2
        case protocolError = 3
    }

    struct Outcome {
        var peer: PeerHello
        var reader: FrameReader
        var keys: SessionKeys
    }

    /// Text from a peer that has not proven it holds the key: printable characters only (no
    /// newlines or terminal escapes to forge log lines with), bounded, and marked as a claim.
    static func untrusted(_ bytes: ArraySlice<UInt8>) -> String {
        let text = String(decoding: bytes, as: UTF8.self)
        var shown = ""
        for scalar in text.unicodeScalars.prefix(maxShownReasonCharacters) {
            let printable = scalar.value >= 0x20 && scalar.value != 0x7F && !(0x80..<0xA0).contains(scalar.value)
            shown.unicodeScalars.append(printable ? scalar : "?")
        }
        if text.unicodeScalars.count > maxShownReasonCharacters { shown += "..." }
        return "\"\(shown)\" (the peer's own words, unauthenticated)"
    }

    static func refusalPayload(_ code: Refusal, _ reason: String) -> [UInt8] {
        [code.rawValue] + Array(reason.utf8.prefix(maxReasonBytes))
    }

    static func mac(_ key: PairKey, _ label: [UInt8], nonceC: [UInt8], nonceS: [UInt8],
                    helloC: [UInt8], helloS: [UInt8]) -> [UInt8] {
        Crypto.hmacSHA256(key: key.bytes, label, nonceC, nonceS, helloC, helloS)
    }

    /// Splits a hello or challenge payload into the nonce and the sender's hello.
    static func parseGreeting(_ payload: [UInt8]) -> (nonce: [UInt8], helloBytes: [UInt8], hello: PeerHello)? {
        guard payload.count > nonceBytes else { return nil }
        let helloBytes = Array(payload[nonceBytes...])
        guard let hello = PeerHello(decoding: helloBytes) else { return nil }
        return (Array(payload[..<nonceBytes]), helloBytes, hello)
    }

    // MARK: Dialing side (primary)

    static func client(socket: Socket, key: PairKey, local: PeerHello, remote: String,
                       deadlineNanos: UInt64, timeout: Duration) throws(GeminusError) -> Outcome {
        let helloC = try local.encoded()
        let nonceC = try Crypto.randomBytes(nonceBytes)
        let channel = HandshakeChannel(socket: socket, deadlineNanos: deadlineNanos)
        let describe = { (f: HandshakeChannel.Failure) -> GeminusError in
            switch f {
            case .timedOut:
                GeminusError(.timeout, "handshake with \(remote) timed out after \(timeout.millisDescription)",
                             fix: "check that \(remote) is a Geminus secondary and the network between the hosts")
            case .endOfStream:
                GeminusError(.connectionFailed, "\(remote) closed the connection during the handshake")
            case .socket(let e):
                GeminusError(.connectionFailed, "handshake with \(remote) failed: \(Socket.describe(errno: e))")
            case .frame(let e):
                GeminusError(.protocolMismatch, "handshake with \(remote) failed: \(e)")
            }
        }

        try channel.io(describe) { c throws(HandshakeChannel.Failure) in
            try c.write(.hello, generation: local.generation, payload: nonceC + helloC)
        }
        let challenge = try channel.io(describe) { c throws(HandshakeChannel.Failure) in try c.read() }
        guard challenge.kind == .challenge else {
            throw unexpected(challenge, expected: .challenge, remote: remote, key: key)
        }
        guard let (nonceS, helloS, peer) = parseGreeting(challenge.payload) else {
            throw GeminusError(.protocolMismatch, "handshake with \(remote) failed: malformed challenge (\(challenge.payload.count) bytes)")
        }
        guard nonceS != nonceC else {
            throw GeminusError(.authenticationFailed, "handshake with \(remote) failed: the peer echoed this agent's nonce")
        }
        let proof = mac(key, clientLabel, nonceC: nonceC, nonceS: nonceS, helloC: helloC, helloS: helloS)
        try channel.io(describe) { c throws(HandshakeChannel.Failure) in
            try c.write(.auth, generation: local.generation, payload: proof)
        }
        let answer = try channel.io(describe) { c throws(HandshakeChannel.Failure) in try c.read() }
        guard answer.kind == .accepted else {
            throw unexpected(answer, expected: .accepted, remote: remote, key: key)
        }
        let expected = mac(key, serverLabel, nonceC: nonceC, nonceS: nonceS, helloC: helloC, helloS: helloS)
        guard Crypto.constantTimeEqual(answer.payload, expected) else {
            throw GeminusError(.authenticationFailed,
                               "\(remote) could not prove it holds the pair key in \(key.path): it is not this pair's secondary, or its key differs",
                               fix: "copy the same key file to both hosts")
        }
        let keys = SessionKeys.derive(pairKey: key.bytes, nonceC: nonceC, nonceS: nonceS, helloC: helloC, helloS: helloS,
                                      isClient: true)
        return Outcome(peer: peer, reader: channel.reader, keys: keys)
    }

    /// A `refused` frame becomes the secondary's reason, shown as its unauthenticated claim
    /// (anyone on the path can send one); anything else out of turn is a protocol violation.
    private static func unexpected(_ frame: Frame, expected: FrameKind, remote: String, key: PairKey) -> GeminusError {
        guard frame.kind == .refused else {
            return GeminusError(.protocolMismatch,
                                "handshake with \(remote) failed: peer sent a \(frame.kind) frame, expected \(expected)")
        }
        let code = frame.payload.first.flatMap(Refusal.init(rawValue:))
        let reason = untrusted(frame.payload.dropFirst())
        switch code {
        case .authenticationFailed:
            return GeminusError(.authenticationFailed,
                                "\(remote) refused this agent, saying authentication failed (unauthenticated claim: either its pair key differs from the one in \(key.path), or something on the path answered for it)",
                                fix: "copy the same key file to both hosts; if the keys match, check what listens at \(remote)")
        case .notAdmitted:
            return GeminusError(.peerRefused, "\(remote) refused this agent: \(reason)")
        case .protocolError, nil:
            return GeminusError(.protocolMismatch, "\(remote) refused the handshake: \(reason)")
        }
    }

    // MARK: Listening side (secondary)

    /// A peer that proved it holds the pair key and waits for the admission decision. The
    /// listener authenticates connections on their own threads (so a slow or silent client
    /// cannot hold the port) and decides admission on its caller's thread.
    struct Authenticated {
        let peer: PeerHello
        fileprivate let channel: HandshakeChannel
        fileprivate let key: PairKey
        fileprivate let local: PeerHello
        fileprivate let transcript: (nonceC: [UInt8], nonceS: [UInt8], helloC: [UInt8], helloS: [UInt8])
        fileprivate let prefix: String
        let remote: String

        var socket: Socket { channel.socket }
        var localHello: PeerHello { local }

        /// Gives the socket back when the connection is not taken.
        func release() { channel.socket.release() }

        /// Asks `admit` (nil to admit, else the reason to refuse), then proves this side's key
        /// and derives the frame keys.
        func finish(admit: (PeerHello) -> String?, timeout: Duration) throws(GeminusError) -> Outcome {
            let t = transcript
            if let reason = admit(peer) {
                throw Handshake.refuse(channel, local, .notAdmitted, reason,
                                       GeminusError(.peerRefused,
                                                    "\(prefix) (\(peer.role) of '\(peer.vmName)', generation \(peer.generation)): \(reason)"))
            }
            let proof = mac(key, serverLabel, nonceC: t.nonceC, nonceS: t.nonceS, helloC: t.helloC, helloS: t.helloS)
            try channel.io(Handshake.serverFailure(prefix, timeout)) { c throws(HandshakeChannel.Failure) in
                try c.write(.accepted, generation: local.generation, payload: proof)
            }
            let keys = SessionKeys.derive(pairKey: key.bytes, nonceC: t.nonceC, nonceS: t.nonceS, helloC: t.helloC, helloS: t.helloS,
                                          isClient: false)
            return Outcome(peer: peer, reader: channel.reader, keys: keys)
        }
    }

    fileprivate static func serverFailure(_ prefix: String, _ timeout: Duration) -> (HandshakeChannel.Failure) -> GeminusError {
        { f in
            switch f {
            case .timedOut:
                GeminusError(.timeout, "\(prefix): no complete handshake within \(timeout.millisDescription)")
            case .endOfStream:
                GeminusError(.connectionFailed, "\(prefix): it closed the connection during the handshake")
            case .socket(let e):
                GeminusError(.connectionFailed, "\(prefix): \(Socket.describe(errno: e))")
            case .frame(let e):
                GeminusError(.protocolMismatch, "\(prefix): \(e)")
            }
        }
    }

    /// Tells the peer why (best effort: it may already be gone), then gives up.
    fileprivate static func refuse(_ channel: HandshakeChannel, _ local: PeerHello, _ code: Refusal, _ reason: String,
                                   _ error: GeminusError) -> GeminusError {
        try? channel.write(.refused, generation: local.generation, payload: refusalPayload(code, reason))
        channel.linger()
        return error
    }

    /// Hello, challenge, auth: everything up to the admission decision.
    static func serverAuthenticate(socket: Socket, key: PairKey, local: PeerHello, remote: String,
                                   deadlineNanos: UInt64, timeout: Duration) throws(GeminusError) -> Authenticated {
        let helloS = try local.encoded()
        let nonceS = try Crypto.randomBytes(nonceBytes)
        let channel = HandshakeChannel(socket: socket, deadlineNanos: deadlineNanos)
        let prefix = "refused connection from \(remote)"
        let describe = serverFailure(prefix, timeout)
        func read() throws(GeminusError) -> Frame {
            do {
                return try channel.read()
            } catch {
                // Answer a peer of another version in our framing: its decoder then reports
                // the version mismatch on its side too.
                if case .frame(let e) = error { throw refuse(channel, local, .protocolError, e.description, describe(error)) }
                throw describe(error)
            }
        }

        let hello = try read()
        guard hello.kind == .hello, let (nonceC, helloC, peer) = parseGreeting(hello.payload) else {
            let what = hello.kind == .hello ? "a malformed hello" : "a \(hello.kind) frame instead of a hello"
            throw refuse(channel, local, .protocolError, "expected a hello", GeminusError(.protocolMismatch, "\(prefix): it sent \(what)"))
        }
        try channel.io(describe) { c throws(HandshakeChannel.Failure) in
            try c.write(.challenge, generation: local.generation, payload: nonceS + helloS)
        }
        let auth = try read()
        guard auth.kind == .auth else {
            throw refuse(channel, local, .protocolError, "expected auth",
                         GeminusError(.protocolMismatch, "\(prefix): it sent a \(auth.kind) frame instead of auth"))
        }
        let expected = mac(key, clientLabel, nonceC: nonceC, nonceS: nonceS, helloC: helloC, helloS: helloS)
        guard Crypto.constantTimeEqual(auth.payload, expected) else {
            throw refuse(channel, local, .authenticationFailed, "authentication failed",
                         GeminusError(.authenticationFailed,
                                      "\(prefix): authentication failed (peer does not hold the pair key in \(key.path))",
                                      fix: "copy the same key file to both hosts"))
        }
        // Only an authenticated peer learns whether it would be admitted (`finish`).
        return Authenticated(peer: peer, channel: channel, key: key, local: local,
                             transcript: (nonceC, nonceS, helloC, helloS), prefix: prefix, remote: remote)
    }

    static func server(socket: Socket, key: PairKey, local: PeerHello, admit: (PeerHello) -> String?,
                       remote: String, deadlineNanos: UInt64, timeout: Duration) throws(GeminusError) -> Outcome {
        try serverAuthenticate(socket: socket, key: key, local: local, remote: remote, deadlineNanos: deadlineNanos, timeout: timeout)
            .finish(admit: admit, timeout: timeout)
    }
}
