import Testing
import GeminusCore
@testable import GeminusTransport

/// Review finding M2: a hello whose numbers no real agent sends is malformed, so the
/// admission and takeover code never multiplies, converts or increments them.
@Suite struct HelloBoundsTests {
    static func hello(generation: UInt64 = 3, committed: UInt64 = 7, pages: UInt64 = 262_144) -> PeerHello {
        PeerHello(role: .primary, vmName: "web-1", generation: Generation(generation), committedEpoch: Epoch(committed),
                  guestPageCount: pages, agentVersion: "test-1.0")
    }

    @Test func absurdNumbersInAHelloAreMalformed() throws {
        #expect(PeerHello(decoding: try Self.hello().encoded()) == Self.hello())
        for bad in [Self.hello(generation: UInt64.max), Self.hello(generation: Generation.maxAccepted.rawValue + 1),
                    Self.hello(committed: UInt64.max), Self.hello(pages: UInt64.max), Self.hello(pages: 1 << 52),
                    Self.hello(pages: GuestPage.maxCount + 1)] {
            #expect(PeerHello(decoding: try bad.encoded()) == nil,
                    "generation \(bad.generation), epoch \(bad.committedEpoch), \(bad.guestPageCount) pages decoded")
        }
        let edge = Self.hello(generation: Generation.maxAccepted.rawValue, committed: Epoch.maxAccepted.rawValue, pages: GuestPage.maxCount)
        #expect(PeerHello(decoding: try edge.encoded()) == edge)
    }
}
