import Foundation
import GeminusCore
import GeminusTestSupport
@testable import GeminusTransport
import Logging
import Testing

/// A fresh private directory per test; the pair key lives there.
func makeTemporaryDirectory() -> String {
    let base = NSTemporaryDirectory().hasSuffix("/") ? NSTemporaryDirectory() : NSTemporaryDirectory() + "/"
    var template = Array((base + "geminus-transport-XXXXXX").utf8CString)
    let path = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    precondition(path != nil, "mkdtemp failed")
    return String(cString: path!)
}

/// A loaded key whose file is already gone: the key lives in memory, the path only in messages.
func makeKey(_ name: String = "pair.key") throws -> PairKey {
    let dir = makeTemporaryDirectory()
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let path = dir + "/" + name
    try PairKey.generate(path: path)
    return try PairKey.load(path: path)
}

func primaryHello(vm: String = "web-1", generation: UInt64 = 3) -> PeerHello {
    PeerHello(role: .primary, vmName: vm, generation: Generation(generation), committedEpoch: Epoch(7),
              guestPageCount: 262_144, agentVersion: "test-1.0")
}

func secondaryHello(vm: String = "web-1", generation: UInt64 = 3) -> PeerHello {
    PeerHello(role: .secondary, vmName: vm, generation: Generation(generation), committedEpoch: Epoch(6),
              guestPageCount: 0, agentVersion: "test-1.0")
}

/// Runs `body` on its own thread (accept and connect block) and hands back its result.
final class Background<T: Sendable>: @unchecked Sendable {
    private let condition = NSCondition()
    private var result: T?

    init(_ body: @escaping @Sendable () -> T) {
        let t = Thread { [self] in
            let r = body()
            condition.lock()
            result = r
            condition.broadcast()
            condition.unlock()
        }
        t.start()
    }

    func wait(seconds: Double = 10) -> T? {
        let until = Date().addingTimeInterval(seconds)
        condition.lock()
        defer { condition.unlock() }
        while result == nil {
            if !condition.wait(until: until) { break }
        }
        return result
    }
}

typealias AcceptResult = Result<FramedConnection?, GeminusError>

func acceptInBackground(_ listener: TCPListener, key: PairKey, local: PeerHello = secondaryHello(),
                        options: LinkOptions = LinkOptions(), timeout: Duration = .seconds(5),
                        admit: @escaping @Sendable (PeerHello) -> String? = { _ in nil }) -> Background<AcceptResult> {
    Background {
        Result { () throws(GeminusError) in
            try listener.accept(key: key, local: local, admit: admit, timeout: timeout, options: options)
        }
    }
}

/// A listener and an authenticated connection pair on 127.0.0.1.
struct ConnectedPair {
    var listener: TCPListener
    var client: FramedConnection
    var server: FramedConnection
    /// The man in the middle, when there is one (kept alive with the pair).
    var relay: TamperingRelay?

    /// `relay`: given the listener's port, a relay to dial instead (a man in the middle).
    init(options: LinkOptions = LinkOptions(), serverOptions: LinkOptions? = nil,
         relay: ((UInt16) throws -> TamperingRelay)? = nil) throws {
        let key = try makeKey()
        listener = try TCPListener(host: "127.0.0.1", port: 0)
        let accepted = acceptInBackground(listener, key: key, options: serverOptions ?? options)
        self.relay = try relay?(listener.port)
        let port = self.relay?.port ?? listener.port
        client = try TCPDialer.connect(host: "127.0.0.1", port: port, key: key, local: primaryHello(),
                                       timeout: .seconds(5), options: options)
        let result = try #require(accepted.wait())
        server = try #require(try result.get())
    }

    func close() {
        client.close()
        server.close()
        listener.close()
        relay?.stop()
    }
}

/// Collects log lines so tests can check what an operator would read.
final class LogCapture: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []

    var logger: Logger {
        Logger(label: "test") { _ in CapturingHandler(capture: self) }
    }

    func append(_ line: String) {
        lock.lock()
        lines.append(line)
        lock.unlock()
    }

    var all: [String] {
        lock.lock()
        defer { lock.unlock() }
        return lines
    }
}

struct CapturingHandler: LogHandler {
    let capture: LogCapture
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    func log(event: LogEvent) {
        capture.append("\(event.level): \(event.message)")
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
}

/// A bare TCP client for speaking something other than Geminus at a listener.
func rawConnect(port: UInt16) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = port.bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let r = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    try #require(r == 0, "connect failed: \(errno)")
    return fd
}

func rawSend(_ fd: Int32, _ bytes: [UInt8]) {
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
}

/// Reads until EOF or `limit` bytes (with a receive timeout so a test cannot hang).
func rawReadAll(_ fd: Int32, limit: Int = 1 << 16) -> [UInt8] {
    var tv = timeval(tv_sec: 5, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while out.count < limit {
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n <= 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return out
}

func elapsedMillis(since start: UInt64) -> Double {
    Double(Monotonic.nanos() - start) / 1e6
}
