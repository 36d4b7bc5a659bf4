import GeminusCore
import GeminusNode
import Testing

/// Released frames the host refused (a spoofed source MAC, a bad length: HostNetwork's counter)
/// reach the primary's status through the output port's snapshot.
@Suite struct HeldOutputPortCountersTests {
    final class RefusingDestination: OutputDestination, @unchecked Sendable {
        func deliver(_ items: [GuestOutputItem], releasedThrough: Epoch?, generation: Generation) {}
        var framesRefused: Int { 3 }
    }

    @Test func refusedFramesShowInTheSnapshot() {
        let port = HeldOutputPort(limitBytes: 1 << 20, destination: RefusingDestination(), generation: Generation(1), openEpoch: Epoch(1))
        #expect(port.snapshot.framesRefused == 3)
    }
}
