import Foundation
import GeminusCore
import GeminusTransport
#if canImport(Glibc)
import Glibc
#endif

/// The pair's TCP link on loopback, as the agents use it (authenticated `FramedConnection`,
/// 256 KiB frames as the encoder sends them), against iperf3 between the same two ends in the
/// same run: how much of the machine's loopback the checkpoint stream can use.
public struct LinkThroughputBench: Sendable {
    public struct Result: Sendable {
        /// Sealed, as the agents run it.
        public var geminusBytesPerSecond = 0.0
        /// The same link with sealing off (a bench-only setting): what sealing costs.
        public var unsealedBytesPerSecond = 0.0
        /// AES-256-GCM sealing alone on one core, frames of the same size.
        public var sealBytesPerSecondPerCore = 0.0
        public var iperf3BytesPerSecond: Double?
        public var iperf3Problem: String?
    }

    public var seconds: Double
    public var frameBytes: Int

    public init(seconds: Double = 3, frameBytes: Int = 256 << 10) {
        self.seconds = seconds
        self.frameBytes = frameBytes
    }

    public func run() throws(GeminusError) -> Result {
        var r = Result()
        r.geminusBytesPerSecond = try framedThroughput(sealed: true)
        r.unsealedBytesPerSecond = try framedThroughput(sealed: false)
        r.sealBytesPerSecondPerCore = SealingSpeed.bytesPerSecond(frameBytes: frameBytes, seconds: min(seconds, 1))
        do throws(GeminusError) {
            r.iperf3BytesPerSecond = try iperf3Throughput()
        } catch {
            r.iperf3Problem = error.message + (error.fix.map { " (fix: \($0))" } ?? "")
        }
        return r
    }

    func framedThroughput(sealed: Bool) throws(GeminusError) -> Double {
        let pair = try LoopbackPair(sealed: sealed)
        defer { pair.close() }
        let received = OneShot<(bytes: Int, nanos: UInt64)>()
        let server = pair.server
        let receiver = Thread {
            var bytes = 0
            var first: UInt64?
            var last: UInt64 = 0
            while let frame = try? server.receive(timeout: .seconds(2)) {
                if first == nil { first = Monotonic.nanos() }
                bytes += frame.payload.count
                last = Monotonic.nanos()
            }
            received.set((bytes, first.map { last - $0 } ?? 0))
        }
        receiver.start()
        let c = pair.client
        let payload = [UInt8](repeating: 0xA5, count: frameBytes)
        let frame = FrameCodec.encode(FrameHeader(kind: .pages, generation: Generation(1), epoch: Epoch(1)), payload: payload)
        let end = Monotonic.nanos() + UInt64(seconds * 1e9)
        while Monotonic.nanos() < end {
            try c.send(frame, timeout: .seconds(5))
        }
        try c.flush(timeout: .seconds(10))
        c.close()
        let (bytes, nanos) = received.wait()
        guard nanos > 0 else { throw GeminusError(.io, "the benchmark link received nothing") }
        return Double(bytes) / (Double(nanos) / 1e9)
    }

    func iperf3Throughput() throws(GeminusError) -> Double {
        guard let iperf3 = ["/usr/bin/iperf3", "/usr/local/bin/iperf3"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw GeminusError(.invalidArgument, "iperf3 is not installed", fix: "apt-get install -y iperf3")
        }
        let port = 52_000 + Int(getpid() % 5000)
        let server = Process()
        server.executableURL = URL(fileURLWithPath: iperf3)
        server.arguments = ["-s", "-1", "-B", "127.0.0.1", "-p", "\(port)"]
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        do { try server.run() } catch { throw GeminusError(.io, "cannot start iperf3: \(error)") }
        defer { if server.isRunning { kill(server.processIdentifier, SIGKILL) }; server.waitUntilExit() }
        Monotonic.sleep(nanos: 300_000_000)
        let client = Process()
        client.executableURL = URL(fileURLWithPath: iperf3)
        client.arguments = ["-c", "127.0.0.1", "-p", "\(port)", "-t", "\(Int(seconds.rounded(.up)))", "-J"]
        let out = Pipe()
        client.standardOutput = out
        client.standardError = FileHandle.nullDevice
        do { try client.run() } catch { throw GeminusError(.io, "cannot start iperf3: \(error)") }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        client.waitUntilExit()
        guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let end = json["end"] as? [String: Any], let sum = end["sum_received"] as? [String: Any],
              let bits = (sum["bits_per_second"] as? NSNumber)?.doubleValue else {
            throw GeminusError(.io, "iperf3 gave no result (exit \(client.terminationStatus))")
        }
        return bits / 8
    }
}

/// Two authenticated agent connections on loopback (a throwaway pair key), as the agents hold
/// them: `client` is the primary's end, `server` the secondary's.
final class LoopbackPair: @unchecked Sendable {
    let client: FramedConnection
    let server: FramedConnection

    init(sealed: Bool = true) throws(GeminusError) {
        let options = { () -> LinkOptions in
            var o = LinkOptions()
            o.sealFrames = sealed
            return o
        }()
        let dir = NSTemporaryDirectory() + "/geminus-bench-link-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try PairKey.generate(path: dir + "/pair.key")
        let key = try PairKey.load(path: dir + "/pair.key")
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        @Sendable func hello(_ role: PeerRole) -> PeerHello {
            PeerHello(role: role, vmName: "bench", generation: Generation(1), committedEpoch: .none,
                      guestPageCount: role == .primary ? 1 : 0, agentVersion: "bench")
        }
        let accepted = OneShot<FramedConnection?>()
        let acceptor = Thread {
            accepted.set(try? listener.accept(key: key, local: hello(.secondary), admit: { _ in nil }, timeout: .seconds(10), options: options))
        }
        acceptor.start()
        client = try TCPDialer.connect(host: "127.0.0.1", port: listener.port, key: key, local: hello(.primary), timeout: .seconds(10),
                                       options: options)
        guard let s = accepted.wait() else {
            client.close()
            throw GeminusError(.io, "the benchmark's loopback secondary did not accept the connection")
        }
        server = s
    }

    func close() {
        client.close()
        server.close()
    }
}

/// A value another thread produces once (a received count, an accepted connection), waited for.
final class OneShot<Value>: @unchecked Sendable {
    private let condition = NSCondition()
    private var value: Value?

    func set(_ v: Value) {
        condition.lock()
        value = v
        condition.broadcast()
        condition.unlock()
    }

    func wait() -> Value {
        condition.lock()
        defer { condition.unlock() }
        while value == nil { condition.wait() }
        return value!
    }
}
