import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// Receives the datagrams agents release to "the network" and remembers them in order.
final class OutputObserver: @unchecked Sendable {
    struct Packet { var generation: UInt64; var packet: OutputPacket }
    let fd: Int32
    let port: UInt16
    private let lock = NSLock()
    private var packets: [Packet] = []
    private var malformed = 0
    /// Datagrams that are no simulated-guest packet: a QEMU guest's console lines, by generation.
    private var console: [(generation: UInt64, text: String)] = []

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        self.fd = fd
        var size: Int32 = 8 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, 4)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard ok else { throw GeminusError(.io, "cannot bind the demo's observer socket on 127.0.0.1") }
        port = UInt16(bigEndian: addr.sin_port)
        let t = Thread { [self] in
            var buf = [UInt8](repeating: 0, count: 2048)
            while true {
                let n = recv(fd, &buf, buf.count, 0)
                if n <= 0 { return }
                var r = ByteReader(Array(buf[0..<n]))
                guard let g = r.u64(), let rest = r.take(r.remaining), let p = OutputPacket(decoding: Array(rest)) else {
                    var whole = ByteReader(Array(buf[0..<n]))
                    let generation = whole.u64() ?? 0
                    let line = n > 8 ? String(decoding: buf[8..<n], as: UTF8.self) : ""
                    lock.lock(); malformed += 1; console.append((generation, line)); lock.unlock()
                    continue
                }
                lock.lock(); packets.append(Packet(generation: g, packet: p)); lock.unlock()
            }
        }
        t.start()
    }

    var snapshot: (packets: [Packet], malformed: Int) { lock.lock(); defer { lock.unlock() }; return (packets, malformed) }
    var consoleLines: [(generation: UInt64, text: String)] { lock.lock(); defer { lock.unlock() }; return console }
    func close() { shutdown(fd, Int32(SHUT_RDWR)); Glibc.close(fd) }
}
