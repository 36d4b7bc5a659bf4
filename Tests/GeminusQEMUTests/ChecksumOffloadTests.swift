import CGeminusSupport
import Testing

/// Frames the host's stack leaves to checksum offload (veths, containers, the host itself)
/// reach the agent's raw socket with the TCP/UDP checksum unfinished; the agent finishes it
/// before the frame goes to the guest, which would drop it otherwise (found with the Linux
/// guest behind a veth: every TCP segment was dropped as a bad checksum).
@Suite struct ChecksumOffloadTests {
    /// One's-complement sum over the pseudo-header and segment: 0xffff when the checksum is right.
    static func verifies(_ f: [UInt8], l3: Int, proto: UInt8, v6: Bool) -> Bool {
        var sum: UInt32 = 0
        func add(_ bytes: ArraySlice<UInt8>) {
            var i = bytes.startIndex
            while i + 1 < bytes.endIndex { sum += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1]); i += 2 }
            if i < bytes.endIndex { sum += UInt32(bytes[i]) << 8 }
        }
        let l4 = v6 ? l3 + 40 : l3 + Int(f[l3] & 0x0f) * 4
        if v6 { add(f[(l3 + 8)..<(l3 + 40)]) } else { add(f[(l3 + 12)..<(l3 + 20)]) }
        sum += UInt32(proto) + UInt32(f.count - l4)
        add(f[l4...])
        while sum >> 16 != 0 { sum = (sum & 0xffff) + (sum >> 16) }
        return sum == 0xffff
    }

    static func ipv4(proto: UInt8, payload: [UInt8], partial: UInt16) -> [UInt8] {
        let l4len = (proto == 6 ? 20 : 8) + payload.count
        var f: [UInt8] = [0x52, 0x54, 0, 1, 2, 3, 0x52, 0x54, 0, 9, 9, 9, 0x08, 0x00]
        let total = 20 + l4len
        f += [0x45, 0, UInt8(total >> 8), UInt8(total & 0xff), 0, 1, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]
        if proto == 6 {
            f += [0x9c, 0x40, 0x1b, 0x58, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, UInt8(partial >> 8), UInt8(partial & 0xff), 0, 0]
        } else {
            f += [0x9c, 0x40, 0x1b, 0x58, UInt8(l4len >> 8), UInt8(l4len & 0xff), UInt8(partial >> 8), UInt8(partial & 0xff)]
        }
        return f + payload
    }

    @Test func aPartialTCPChecksumIsFinished() {
        // The sender left the pseudo-header sum in the field, as offload does.
        var f = Self.ipv4(proto: 6, payload: Array("TXN 7 100\n".utf8), partial: 0x14cb)
        #expect(!Self.verifies(f, l3: 14, proto: 6, v6: false))
        #expect(geminus_l4_checksum_fix(&f, f.count) == 1)
        #expect(Self.verifies(f, l3: 14, proto: 6, v6: false))
    }

    @Test func udpAndIPv6AreFinishedAndOtherFramesLeftAlone() {
        var u = Self.ipv4(proto: 17, payload: [1, 2, 3, 4, 5], partial: 0x1234)
        #expect(geminus_l4_checksum_fix(&u, u.count) == 1)
        #expect(Self.verifies(u, l3: 14, proto: 17, v6: false))

        var v6: [UInt8] = [0x52, 0x54, 0, 1, 2, 3, 0x52, 0x54, 0, 9, 9, 9, 0x86, 0xdd]
        let seg: [UInt8] = [0x9c, 0x40, 0x1b, 0x58, 0, 12, 0xab, 0xcd, 9, 8, 7, 6]
        v6 += [0x60, 0, 0, 0, 0, UInt8(seg.count), 17, 64] + [UInt8](repeating: 0xfe, count: 16) + [UInt8](repeating: 0x20, count: 16) + seg
        #expect(geminus_l4_checksum_fix(&v6, v6.count) == 1)
        #expect(Self.verifies(v6, l3: 14, proto: 17, v6: true))

        var arp: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 9, 9, 9, 0x08, 0x06] + [UInt8](repeating: 0, count: 28)
        let before = arp
        #expect(geminus_l4_checksum_fix(&arp, arp.count) == 0)
        #expect(arp == before)
        // A frame shorter than its IP header says is left alone, never read past its end.
        var short = Array(Self.ipv4(proto: 6, payload: [1, 2, 3], partial: 0).prefix(40))
        #expect(geminus_l4_checksum_fix(&short, short.count) == 0)
    }
}
