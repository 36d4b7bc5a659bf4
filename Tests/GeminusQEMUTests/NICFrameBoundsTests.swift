import Foundation
import Testing
import GeminusCore
@testable import GeminusQEMU

/// Review finding M8: the length in front of each frame from the guest's NIC is the guest's
/// word. One over 65535 bytes is skipped as it streams past (never buffered, never released)
/// and counted in the status line; the frames around it arrive as usual.
@Suite struct NICFrameBoundsTests {
    @Test func anOversizeFrameIsSkippedAndCountedAndTheStreamStaysInStep() throws {
        let path = NSTemporaryDirectory() + "geminus-nic-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).nic"
        let nic = try GuestNIC(NICSetup(mac: MACAddress("52:54:00:12:34:56")!, socketPath: path))
        defer { nic.stop() }
        let qemu = try GuestNICTests.connect(path)
        defer { close(qemu) }
        let port = GuestNICTests.Port()
        nic.attach(port)
        let huge = [UInt8](repeating: 0xEE, count: NICFrameStream.maxFrameBytes + 1 + 300_000)
        let bytes = GuestNICTests.framed(GuestNICTests.frame(1)) + GuestNICTests.framed(huge) + GuestNICTests.framed(GuestNICTests.frame(2))
        var off = 0
        while off < bytes.count {
            let w = bytes[off...].withUnsafeBytes { write(qemu, $0.baseAddress, min($0.count, 10_000)) }
            try #require(w > 0)
            off += w
        }
        #expect(SerialOutputTests.waitFor { port.snapshot.count >= 2 })
        Thread.sleep(forTimeInterval: 0.05)
        #expect(port.snapshot.map(\.count) == [GuestNICTests.frame(1).count, GuestNICTests.frame(2).count])
        #expect(nic.oversizeFrames == 1)
        #expect(nic.statusLine.contains("1 frames over 65535 bytes dropped"), "\(nic.statusLine)")
    }

    /// The parser alone, fed one byte at a time and in one piece: a 4 GiB announcement costs
    /// nothing, and the frames around it come out whole.
    @Test func theParserNeverBuffersAnAnnouncedGiant() {
        let giant: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF] + [UInt8](repeating: 7, count: 100)
        let input = GuestNICTests.framed([1, 2, 3]) + giant
        for piece in [1, input.count] {
            var s = NICFrameStream()
            var frames: [[UInt8]] = []
            var i = 0
            while i < input.count {
                s.feed(input[i..<min(i + piece, input.count)], into: &frames)
                i += piece
            }
            #expect(frames == [[1, 2, 3]])
            #expect(s.oversizeFrames == 1)
        }
        var s = NICFrameStream()
        var frames: [[UInt8]] = []
        let whole = [UInt8](repeating: 9, count: NICFrameStream.maxFrameBytes + 5)
        s.feed(ArraySlice(GuestNICTests.framed(whole) + GuestNICTests.framed([4])), into: &frames)
        #expect(frames == [[4]] && s.oversizeFrames == 1)
    }
}
