import Foundation
import Testing
import GeminusCore
@testable import GeminusQEMU

/// The agent's NBD server against a hand-written client speaking the protocol as QEMU's does
/// (fixed newstyle, STRUCTURED_REPLY refused, GO): writes are recorded in order and handed to
/// one checkpoint each, dropped while nothing is protected, reads come from the disk file, a
/// write beyond the disk is refused, and the connection's end is reported.
@Suite struct NBDExportTests {
    struct Client {
        let fd: Int32
        func put(_ b: [UInt8]) { _ = b.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) } }
        func get(_ n: Int) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: n)
            var done = 0
            while done < n {
                let r = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, n - done, 0) }
                guard r > 0 else { return Array(out[0..<done]) }
                done += r
            }
            return out
        }
        static func be(_ v: UInt64, _ bytes: Int) -> [UInt8] { (0..<bytes).map { UInt8(truncatingIfNeeded: v >> UInt64(8 * (bytes - 1 - $0))) } }
        static func num(_ b: [UInt8]) -> UInt64 { b.reduce(0) { $0 << 8 | UInt64($1) } }
        func option(_ code: UInt32, _ data: [UInt8] = []) {
            put(Self.be(0x4948_4156_454f_5054, 8) + Self.be(UInt64(code), 4) + Self.be(UInt64(data.count), 4) + data)
        }
        /// One option reply: (type, data).
        func reply() -> (UInt32, [UInt8]) {
            let h = get(20)
            let length = Int(Self.num(Array(h[16..<20])))
            return (UInt32(Self.num(Array(h[12..<16]))), get(length))
        }
        func request(_ type: UInt16, handle: UInt64, offset: UInt64, length: UInt32, data: [UInt8] = []) {
            put(Self.be(0x2560_9513, 4) + Self.be(0, 2) + Self.be(UInt64(type), 2) + Self.be(handle, 8) + Self.be(offset, 8) + Self.be(UInt64(length), 4) + data)
        }
        /// A simple reply: (error, handle).
        func simpleReply() -> (UInt32, UInt64) {
            let r = get(16)
            return (UInt32(Self.num(Array(r[4..<8]))), Self.num(Array(r[8..<16])))
        }
    }

    @Test func handshakeWritesReadsAndTheCheckpointBoundary() throws {
        let dir = NSTemporaryDirectory() + "geminus-nbd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size: UInt64 = 1 << 20
        let setup = DiskSetup(path: dir + "/disk", sizeBytes: size, exportSocketPath: dir + "/nbd")
        try ReplicatedDisk.createEmpty(setup)
        // The disk file holds a known block, served by READ.
        let known = [UInt8](repeating: 0xAB, count: 512)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: setup.path))
        try h.seek(toOffset: 4096)
        try h.write(contentsOf: Data(known))
        try h.close()

        let export = try NBDExport(socketPath: setup.exportSocketPath, diskPath: setup.path, sizeBytes: size)
        defer { export.stop() }
        let collecting = Flag()
        export.collect { collecting.value }
        let c = Client(fd: try UnixSocket.connect(path: setup.exportSocketPath, timeout: 2, what: "the export"))
        defer { close(c.fd) }

        let greeting = c.get(18)
        #expect(Client.num(Array(greeting[0..<8])) == 0x4e42_444d_4147_4943)
        #expect(Client.num(Array(greeting[8..<16])) == 0x4948_4156_454f_5054)
        #expect(Client.num(Array(greeting[16..<18])) & 0x1 == 0x1, "fixed newstyle")
        c.put(Client.be(0x3, 4))  // FIXED_NEWSTYLE | NO_ZEROES
        c.option(8)  // STRUCTURED_REPLY: not offered
        #expect(c.reply().0 == 0x8000_0001)
        let name = Array("geminus".utf8)
        c.option(7, Client.be(UInt64(name.count), 4) + name + Client.be(0, 2))  // GO
        let info = c.reply()
        #expect(info.0 == 3 && Client.num(Array(info.1[0..<2])) == 0 && Client.num(Array(info.1[2..<10])) == size)
        #expect(c.reply().0 == 1, "ACK ends the option")
        #expect(SerialOutputTests.waitFor { export.isConnected })

        // Not protecting: a write is acknowledged but not kept.
        c.request(1, handle: 1, offset: 0, length: 4, data: [1, 2, 3, 4])
        #expect(c.simpleReply() == (0, 1))
        #expect(export.take().isEmpty)

        // Protecting: writes kept in order, each checkpoint takes what came before it.
        collecting.value = true
        c.request(1, handle: 2, offset: 8192, length: 3, data: [7, 8, 9])
        c.request(1, handle: 3, offset: 0, length: 2, data: [5, 6])
        #expect(c.simpleReply() == (0, 2))
        #expect(c.simpleReply() == (0, 3))
        #expect(export.take() == [DiskWrite(offset: 8192, data: [7, 8, 9]), DiskWrite(offset: 0, data: [5, 6])])
        c.request(3, handle: 4, offset: 0, length: 0)  // FLUSH
        #expect(c.simpleReply() == (0, 4))
        #expect(export.take().isEmpty)

        // Beyond the disk: refused (EINVAL), not recorded.
        c.request(1, handle: 5, offset: size - 2, length: 4, data: [0, 0, 0, 0])
        #expect(c.simpleReply() == (22, 5))
        let kept = export.take()
        #expect(kept.isEmpty, "\(kept.count) refused writes were kept, \(kept.map(\.data.count).reduce(0, +)) bytes")

        // READ from the primary's disk file.
        c.request(0, handle: 6, offset: 4096, length: 512)
        #expect(c.simpleReply() == (0, 6))
        #expect(c.get(512) == known)

        // DISC: the export says the mirror is gone.
        c.request(2, handle: 7, offset: 0, length: 0)
        #expect(SerialOutputTests.waitFor { !export.isConnected })
        #expect(export.lost?.contains("disconnected") == true)
    }

    /// Review finding L1: a request's length is the client's word (up to 4 GiB). Out of range
    /// or over the 32 MiB maximum, it is refused with EINVAL before anything is allocated, a
    /// refused WRITE's payload is skipped, and the connection keeps working.
    @Test func oversizedAndOutOfRangeRequestsAreRefusedBeforeAllocating() throws {
        let dir = NSTemporaryDirectory() + "geminus-nbd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size: UInt64 = 64 << 20
        let setup = DiskSetup(path: dir + "/disk", sizeBytes: size, exportSocketPath: dir + "/nbd")
        try ReplicatedDisk.createEmpty(setup)
        let export = try NBDExport(socketPath: setup.exportSocketPath, diskPath: setup.path, sizeBytes: size)
        defer { export.stop() }
        export.collect { true }
        let c = Client(fd: try UnixSocket.connect(path: setup.exportSocketPath, timeout: 2, what: "the export"))
        defer { close(c.fd) }
        _ = c.get(18)
        c.put(Client.be(0x3, 4))
        let name = Array("geminus".utf8)
        c.option(7, Client.be(UInt64(name.count), 4) + name + Client.be(0, 2))
        #expect(c.reply().0 == 3 && c.reply().0 == 1)

        let peakBefore = Self.peakResidentBytes()
        c.request(0, handle: 1, offset: 0, length: 0xFFFF_FFF0)
        #expect(c.simpleReply() == (22, 1))
        #expect(Self.peakResidentBytes() - peakBefore < 256 << 20, "a refused READ allocated its length")
        c.request(0, handle: 2, offset: size, length: 1)
        #expect(c.simpleReply() == (22, 2))
        c.request(0, handle: 3, offset: UInt64.max, length: 2)
        #expect(c.simpleReply() == (22, 3))

        // Inside the export but over the maximum: refused, the payload skipped, nothing kept.
        let long = Int(NBDExport.maxRequestBytes) + 4096
        c.request(1, handle: 4, offset: 0, length: UInt32(long), data: [UInt8](repeating: 0x5A, count: long))
        #expect(c.simpleReply() == (22, 4))
        c.request(1, handle: 5, offset: UInt64.max - 1, length: 4, data: [1, 2, 3, 4])
        #expect(c.simpleReply() == (22, 5))
        let kept = export.take()
        #expect(kept.isEmpty, "\(kept.count) refused writes were kept, \(kept.map(\.data.count).reduce(0, +)) bytes")

        // The connection is still in step: a good write and read work.
        c.request(1, handle: 6, offset: 512, length: 3, data: [7, 8, 9])
        #expect(c.simpleReply() == (0, 6))
        #expect(export.take() == [DiskWrite(offset: 512, data: [7, 8, 9])])
        c.request(0, handle: 7, offset: 0, length: 16)
        #expect(c.simpleReply() == (0, 7))
        #expect(c.get(16) == [UInt8](repeating: 0, count: 16))
        #expect(export.isConnected)
    }

    static func peakResidentBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return usage.ru_maxrss * 1024
    }

    final class Flag: @unchecked Sendable {
        private let lock = NSLock()
        private var _value = false
        var value: Bool {
            get { lock.withLock { _value } }
            set { lock.withLock { _value = newValue } }
        }
    }
}
