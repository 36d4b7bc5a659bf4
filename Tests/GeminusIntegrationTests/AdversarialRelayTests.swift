import Foundation
import GeminusCore
import GeminusTestSupport
import Testing

/// Two real agent processes with a man in the middle on their link (review finding C1, issue
/// 18's "relay" test). On each connection, once the pair is protected, the relay makes one
/// attack: forged acks (in the clear and "sealed" with a guessed tag), forged handovers, a
/// replayed frame, a flipped bit, a dropped frame. Every one must be refused: the connection
/// ends, the side that got the frame says why, the primary never counts a forged
/// acknowledgement (so it releases nothing on one), the secondary never resumes the guest; and
/// after each attack the pair reconnects and is protected again.
@Suite(.serialized) struct AdversarialRelayTests {
    enum Attack: CaseIterable {
        case forgedAckInClear, forgedSealedAck, forgedHandoverInClear, forgedSealedHandover, replayedFrame, flippedBit, droppedFrame

        /// The side that receives the bad frame, and what it must say.
        var victimIsPrimary: Bool { self == .forgedAckInClear || self == .forgedSealedAck }
        var expectedReason: String {
            switch self {
            case .forgedAckInClear, .forgedHandoverInClear: "in the clear after the handshake"
            default: "failed authentication"
            }
        }
    }

    /// Far above any epoch of a short run: an acknowledgement this high can only be forged.
    static let forgedEpoch: UInt64 = 1_000_000

    /// Applies attack number `connection` once that connection has carried a few real acks.
    final class Attacker: @unchecked Sendable {
        private let lock = NSLock()
        private var acks: [Int: Int] = [:]
        private var done: Set<Int> = []
        private var previous: [Int: [UInt8]] = [:]
        private(set) var performed: [Attack] = []

        func act(_ connection: Int, _ direction: TamperingRelay.Direction, _ f: TamperingRelay.WireFrame) -> [[UInt8]] {
            lock.lock()
            defer { lock.unlock() }
            guard connection < Attack.allCases.count, f.sealed, !done.contains(connection) else { return [f.bytes] }
            let attack = Attack.allCases[connection]
            if direction == .toDialer && f.kind == FrameKind.ack.rawValue { acks[connection, default: 0] += 1 }
            let ready = acks[connection, default: 0] >= 3
            defer { if direction == .toListener && f.kind == FrameKind.pages.rawValue { previous[connection] = f.bytes } }
            guard ready, attack.victimIsPrimary == (direction == .toDialer) else { return [f.bytes] }
            let out: [[UInt8]]?
            switch attack {
            case .forgedAckInClear:
                out = [ForgedFrame.clear(.ack, generation: f.generation, epoch: AdversarialRelayTests.forgedEpoch), f.bytes]
            case .forgedSealedAck:
                out = [ForgedFrame.sealed(.ack, generation: f.generation, epoch: AdversarialRelayTests.forgedEpoch), f.bytes]
            case .forgedHandoverInClear:
                out = [ForgedFrame.clear(.handover, generation: f.generation, epoch: f.epoch), f.bytes]
            case .forgedSealedHandover:
                out = [ForgedFrame.sealed(.handover, generation: f.generation, epoch: f.epoch), f.bytes]
            case .replayedFrame:
                out = previous[connection].map { [f.bytes, $0] }
            case .flippedBit:
                out = f.payloadLength > 0 ? [ForgedFrame.flipped(f.bytes, at: FrameHeader.size + f.payloadLength / 2, bit: 3)] : nil
            case .droppedFrame:
                out = f.kind == FrameKind.epochEnd.rawValue ? [] : nil
            }
            guard let out else { return [f.bytes] }
            done.insert(connection)
            performed.append(attack)
            return out
        }
    }

    @Test func everyForgedReplayedOrAlteredFrameIsRefused() throws {
        let s = try Scratch()
        defer { s.remove() }
        let key = s.path("pair.key")
        #expect(try GeminusBinary.run(["keygen", "--out", key]).status == 0)
        // --takeover-after-millis: without arbitration a cut link would otherwise end in a
        // takeover; here the secondary must wait for the primary to come back, so that a
        // resume could only come from a forged handover.
        let common = ["--vm", "billing-1", "--key", key, "--events", "--log-level", "warning", "--arbitration", "none"]
        let secondary = try AgentProcess(name: "secondary", executable: GeminusBinary.url,
                                         arguments: ["agent", "--role", "secondary", "--listen", "127.0.0.1:0",
                                                     "--takeover-after-millis", "600000", "--status-socket", s.path("s.sock")] + common,
                                         logFile: s.url.appendingPathComponent("s.log"))
        defer { secondary.stop() }
        let port = try #require(secondary.wait(for: .listening, timeoutSeconds: 10)?["port"] as? Int)
        let attacker = Attacker()
        let relay = try TamperingRelay(targetPort: UInt16(port)) { c, d, f in attacker.act(c, d, f) }
        defer { relay.stop() }
        let primary = try AgentProcess(name: "primary", executable: GeminusBinary.url,
                                       arguments: ["agent", "--role", "primary", "--peer", "127.0.0.1:\(relay.port)", "--ram-mib", "16",
                                                   "--trace-epochs", "--status-socket", s.path("p.sock")] + common,
                                       logFile: s.url.appendingPathComponent("p.log"))
        defer { primary.stop() }
        func logs() -> String {
            ["p.log", "s.log"].map { (try? String(contentsOf: s.url.appendingPathComponent($0), encoding: .utf8)) ?? "" }.joined(separator: "\n---\n")
        }

        var primaryMark = 0
        var secondaryMark = 0
        for (index, attack) in Attack.allCases.enumerated() {
            #expect(primary.wait(for: .protected, timeoutSeconds: 30, from: primaryMark) != nil, "\(attack): not protected before the attack\n\(logs())")
            // The relay attacks once the connection has carried a few acks; the link must end.
            let lost = primary.wait(for: .linkLost, timeoutSeconds: 30, from: primaryMark)
            #expect(lost != nil, "\(attack): the primary kept the link\n\(logs())")
            let heard = secondary.wait(for: .linkLost, timeoutSeconds: 10, from: secondaryMark)
            #expect(heard != nil, "\(attack): the secondary kept the link")
            let victimReason = (attack.victimIsPrimary ? lost : heard)?["reason"] as? String ?? ""
            #expect(victimReason.contains(attack.expectedReason), "\(attack): reason was '\(victimReason)'")
            #expect(relay.connectionCount >= index + 1)
            primaryMark = primary.eventCount
            secondaryMark = secondary.eventCount
        }
        // And the pair is whole again after the last attack.
        #expect(primary.wait(for: .protected, timeoutSeconds: 30, from: primaryMark) != nil, "\(logs())")
        #expect(attacker.performed == Attack.allCases)
        #expect(primary.highestAcknowledged > 0 && primary.highestAcknowledged < Self.forgedEpoch,
                "a forged acknowledgement was counted: \(primary.highestAcknowledged)")
        #expect(secondary.last(.tookOver) == nil, "the secondary resumed the guest on a forged frame\n\(logs())")
        #expect(secondary.last(.handoverRequested) == nil)
    }
}
