import Foundation
import Testing
import GeminusCore
import GeminusHypervisor
@testable import GeminusQEMU

/// The guest NIC's agent end against a real unix stream socket standing in for QEMU's
/// `-netdev stream` client: length-prefixed frames become frames in order, a full port keeps
/// them waiting (stalled) without losing or reordering one, frames split across reads are
/// joined, and frames for the guest are written whole and length-prefixed.
@Suite struct GuestNICTests {
    final class Port: GuestOutputPort, @unchecked Sendable {
        let lock = NSLock()
        var room = Int.max
        var frames: [[UInt8]] = []
        func offer(_ packet: [UInt8]) -> Bool { Issue.record("a frame came as a console line"); return false }
        func offerFrame(_ frame: [UInt8]) -> Bool {
            lock.withLock {
                guard room > 0 else { return false }
                room -= 1
                frames.append(frame)
                return true
            }
        }
        var snapshot: [[UInt8]] { lock.withLock { frames } }
    }

    static func connect(_ path: String) throws -> Int32 {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard r == 0 else { throw GeminusError(.io, "cannot connect to \(path)") }
        return s
    }

    static func framed(_ frame: [UInt8]) -> [UInt8] {
        let n = UInt32(frame.count)
        return [UInt8(n >> 24), UInt8(truncatingIfNeeded: n >> 16), UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] + frame
    }

    static func frame(_ k: Int) -> [UInt8] { [UInt8](repeating: UInt8(truncatingIfNeeded: k), count: 60 + k % 7) + Array("frame-\(k)".utf8) }

    @Test func framesInOrderThroughAFullPortAndWholeFramesToTheGuest() throws {
        let path = NSTemporaryDirectory() + "geminus-nic-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).nic"
        let nic = try GuestNIC(NICSetup(mac: MACAddress("52:54:00:12:34:56")!, socketPath: path))
        defer { nic.stop() }
        let qemu = try Self.connect(path)
        defer { close(qemu) }
        let port = Port()
        port.room = 5
        nic.attach(port)
        // 40 frames in one write, the last one split across two writes.
        var bytes: [UInt8] = []
        for k in 0..<40 { bytes += Self.framed(Self.frame(k)) }
        let last = Self.framed(Self.frame(40))
        bytes += last[0..<10]
        _ = bytes.withUnsafeBytes { write(qemu, $0.baseAddress, $0.count) }
        #expect(SerialOutputTests.waitFor { port.snapshot.count == 5 && nic.isStalled })
        // Still read while stalled (QEMU must never find the socket full), nothing offered past the room.
        Thread.sleep(forTimeInterval: 0.05)
        #expect(port.snapshot.count == 5)
        _ = Array(last[10...]).withUnsafeBytes { write(qemu, $0.baseAddress, $0.count) }
        port.lock.withLock { port.room = .max }
        nic.drain()
        #expect(SerialOutputTests.waitFor { port.snapshot.count == 41 })
        #expect(port.snapshot == (0...40).map(Self.frame), "frames lost, changed or reordered")
        #expect(!nic.isStalled)
        #expect(nic.framesOut == 41)

        // To the guest: whole, length-prefixed.
        nic.deliver([1, 2, 3])
        nic.deliver(Self.frame(7))
        var got = [UInt8](repeating: 0, count: 256)
        var have: [UInt8] = []
        #expect(SerialOutputTests.waitFor {
            let n = got.withUnsafeMutableBytes { recv(qemu, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 { have += got[0..<n] }
            return have.count >= 7 + 4 + Self.frame(7).count
        })
        #expect(have == Self.framed([1, 2, 3]) + Self.framed(Self.frame(7)))
        #expect(nic.framesIn.delivered == 2 && nic.framesIn.dropped == 0)
    }

    @Test func macAddressesParseAndDeriveStably() {
        #expect(MACAddress("52:54:00:ab:CD:0f")?.description == "52:54:00:ab:cd:0f")
        #expect(MACAddress("52:54:00:ab:cd") == nil)
        #expect(MACAddress("52:54:00:ab:cd:zz") == nil)
        #expect(MACAddress("01:00:5e:00:00:01")?.isMulticast == true)
        let a = MACAddress.derived(from: "billing-1")
        #expect(a == MACAddress.derived(from: "billing-1") && a != MACAddress.derived(from: "billing-2"))
        #expect(!a.isMulticast && a.bytes[0] == 0x52)
    }

    @Test func qemuIsGivenAStreamBackendToTheAgentsSocket() {
        var c = QEMUGuestConfig.standard(tag: "t", ramMiB: 32, kernelPath: "/k", append: "", runDirectory: "/run/x")
        c.addNIC(mac: MACAddress("52:54:00:00:00:01")!)
        let a = QEMULauncher.arguments(for: c)
        #expect(a.contains("stream,id=n0,server=off,addr.type=unix,addr.path=/run/x/t.nic"))
        #expect(a.contains("ne2k_isa,netdev=n0,mac=52:54:00:00:00:01"))
    }
}

/// The same NIC connecting to a QEMU that listens on loopback TCP (an enrolled libvirt domain's
/// `<interface type='server'>`, QEMU's `-netdev socket,listen=`): it connects once QEMU listens,
/// tags each frame it offers with its NIC's index (a guest with several NICs), and writes the
/// untagged frames it delivers with the same length prefix.
@Suite struct GuestNICConnectingTests {
    @Test func connectsLaterTagsFramesAndDeliversUntagged() throws {
        // A port nobody listens on yet: the NIC keeps trying.
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = UInt32(0x7f000001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(probe, $0, len) == 0 && getsockname(probe, $0, &len) == 0 } }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        close(probe)

        let nic = GuestNIC(connectingTo: "127.0.0.1", port: port, mac: MACAddress("52:54:00:12:34:57")!, tag: 2)
        defer { nic.stop() }
        let out = GuestNICTests.Port()
        nic.attach(out)
        Thread.sleep(forTimeInterval: 0.1)
        #expect(!nic.isConnected)
        #expect(nic.statusLine.contains("NOT CONNECTED"))

        // "QEMU" starts listening; the NIC connects within its retry interval.
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        var one: Int32 = 1
        _ = setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        try #require(bound == 0 && listen(listener, 1) == 0)
        let qemu = accept(listener, nil, nil)
        try #require(qemu >= 0)
        defer { close(qemu) }
        #expect(nic.waitConnected(timeout: 5))

        var bytes: [UInt8] = []
        for k in 0..<10 { bytes += GuestNICTests.framed(GuestNICTests.frame(k)) }
        _ = bytes.withUnsafeBytes { write(qemu, $0.baseAddress, $0.count) }
        nic.drain()
        #expect(SerialOutputTests.waitFor { out.snapshot.count == 10 })
        #expect(out.snapshot == (0..<10).map { [2] + GuestNICTests.frame($0) }, "frames not tagged with the NIC's index, or reordered")

        nic.deliver(GuestNICTests.frame(3))
        var got = [UInt8](repeating: 0, count: 256)
        var have: [UInt8] = []
        #expect(SerialOutputTests.waitFor {
            let n = got.withUnsafeMutableBytes { recv(qemu, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 { have += got[0..<n] }
            return have.count >= 4 + GuestNICTests.frame(3).count
        })
        #expect(have == GuestNICTests.framed(GuestNICTests.frame(3)))
        #expect(nic.framesIn.delivered == 1)
    }
}
