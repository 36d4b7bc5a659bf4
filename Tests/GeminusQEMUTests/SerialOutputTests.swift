import Foundation
import Testing
import GeminusCore
import GeminusHypervisor
@testable import GeminusQEMU

/// The console-as-output reader against a real unix socket standing in for QEMU's chardev:
/// lines become packets in order, a full port stops the reading without losing a byte, an
/// unended line waits, and `drain` takes what was written before it returns.
@Suite struct SerialOutputTests {
    final class Port: GuestOutputPort, @unchecked Sendable {
        let lock = NSLock()
        var accept = true
        var lines: [String] = []
        func offer(_ packet: [UInt8]) -> Bool {
            lock.withLock {
                guard accept else { return false }
                lines.append(String(decoding: packet, as: UTF8.self))
                return true
            }
        }
        var snapshot: [String] { lock.withLock { lines } }
    }

    /// A listening unix socket (QEMU's side) and the accepted connection.
    final class FakeChardev: @unchecked Sendable {
        let listener: Int32
        var conn: Int32 = -1
        let path: String
        init() throws {
            path = NSTemporaryDirectory() + "geminus-serial-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
            listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
            let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            guard r == 0, listen(listener, 1) == 0 else { throw GeminusError(.io, "cannot listen on \(path)") }
        }
        func accept() { conn = Glibc.accept(listener, nil, nil) }
        func write(_ s: String) { _ = Array(s.utf8).withUnsafeBytes { Glibc.write(conn, $0.baseAddress, $0.count) } }
        deinit { close(conn); close(listener); unlink(path) }
    }

    static func waitFor(_ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(3)
        while Date() < deadline { if condition() { return true }; Thread.sleep(forTimeInterval: 0.005) }
        return false
    }

    @Test func linesInOrderBackpressureAndDrain() throws {
        let chardev = try FakeChardev()
        let acceptor = Thread { chardev.accept() }
        acceptor.start()
        let serial = try SerialOutput(socketPath: chardev.path)
        defer { serial.stop() }
        #expect(Self.waitFor { chardev.conn >= 0 })
        let port = Port()
        // Printed before any port: kept in the socket, not lost.
        chardev.write("counter=1\n")
        Thread.sleep(forTimeInterval: 0.05)
        serial.attach(port)
        chardev.write("counter=2\ncounter=3\ncoun")
        #expect(Self.waitFor { port.snapshot.count == 3 }, "\(port.snapshot)")
        #expect(port.snapshot == ["counter=1\n", "counter=2\n", "counter=3\n"], "an unended line waits")
        // A full port: nothing is taken, nothing is lost.
        port.lock.withLock { port.accept = false }
        chardev.write("ter=4\ncounter=5\n")
        Thread.sleep(forTimeInterval: 0.05)
        #expect(port.snapshot.count == 3)
        port.lock.withLock { port.accept = true }
        #expect(Self.waitFor { port.snapshot.count == 5 })
        #expect(port.snapshot.suffix(2) == ["counter=4\n", "counter=5\n"])
        // drain() returns with everything written before it offered (the epoch boundary).
        chardev.write("counter=6\n")
        serial.drain()
        #expect(port.snapshot.last == "counter=6\n")
        #expect(serial.linesOffered == 6)
    }
}
