import Foundation
import GeminusNode

/// An agent run as a separate process, and the JSON events it prints (`--events`): used by
/// `geminus demo` and by the tests that drive real agent processes.
public final class AgentProcess: @unchecked Sendable {
    public let name: String
    public let process = Process()
    private let lock = NSCondition()
    private var events: [[String: Any]] = []
    private var done = false
    /// Per-epoch trace events are kept compactly (bounded), not in `events`.
    private var checkpointCounters: [UInt64: UInt64] = [:]
    private var acknowledged: UInt64 = 0
    private static let tracedEpochsKept = 100_000

    public init(name: String, executable: URL, arguments: [String], logFile: URL) throws {
        self.name = name
        process.executableURL = executable
        process.arguments = arguments
        let out = Pipe()
        process.standardOutput = out
        FileManager.default.createFile(atPath: logFile.path, contents: nil)
        process.standardError = try FileHandle(forWritingTo: logFile)
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let reader = Thread { [self] in
            var pending = Data()
            let handle = out.fileHandleForReading
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                pending.append(chunk)
                while let nl = pending.firstIndex(of: 10) {
                    let line = pending[pending.startIndex..<nl]
                    pending = Data(pending[(nl + 1)...])
                    if let obj = try? JSONSerialization.jsonObject(with: line) as? [String: Any] {
                        lock.lock()
                        record(obj)
                        lock.broadcast()
                        lock.unlock()
                    }
                }
            }
            lock.lock(); done = true; lock.broadcast(); lock.unlock()
        }
        reader.start()
    }

    private func record(_ obj: [String: Any]) {
        switch obj["event"] as? String {
        case "checkpoint":
            if let e = obj["epoch"] as? UInt64, let c = obj["counter"] as? UInt64 {
                checkpointCounters[e] = c
                if e > UInt64(Self.tracedEpochsKept) { checkpointCounters.removeValue(forKey: e - UInt64(Self.tracedEpochsKept)) }
            }
        case "acknowledged":
            acknowledged = max(acknowledged, obj["epoch"] as? UInt64 ?? 0)
        default:
            events.append(obj)
        }
    }

    /// The guest's counter captured at `epoch` (needs `--trace-epochs`).
    public func counter(atCheckpoint epoch: UInt64) -> UInt64? {
        lock.lock(); defer { lock.unlock() }
        return checkpointCounters[epoch]
    }

    /// The highest epoch whose acknowledgement the agent received (needs `--trace-epochs`).
    public var highestAcknowledged: UInt64 { lock.lock(); defer { lock.unlock() }; return acknowledged }

    /// Waits for the first event named `name` after index `from` that `matches`.
    public func wait(for name: EventName, timeoutSeconds: Double, from: Int = 0,
                     where matches: ([String: Any]) -> Bool = { _ in true }) -> [String: Any]? {
        wait(for: name.rawValue, timeoutSeconds: timeoutSeconds, from: from, where: matches)
    }

    /// Waits for the first event of `type` after index `from` that `matches`.
    public func wait(for type: String, timeoutSeconds: Double, from: Int = 0,
                     where matches: ([String: Any]) -> Bool = { _ in true }) -> [String: Any]? {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        lock.lock()
        defer { lock.unlock() }
        while true {
            if let e = events.dropFirst(from).first(where: { $0["event"] as? String == type && matches($0) }) { return e }
            if done || !lock.wait(until: deadline) {
                return events.dropFirst(from).first(where: { $0["event"] as? String == type && matches($0) })
            }
        }
    }

    public func last(_ name: EventName) -> [String: Any]? { last(name.rawValue) }

    public func last(_ type: String) -> [String: Any]? {
        lock.lock(); defer { lock.unlock() }
        return events.last { $0["event"] as? String == type }
    }

    public var eventCount: Int { lock.lock(); defer { lock.unlock() }; return events.count }

    public func kill(_ signal: Int32) {
        if process.isRunning { Foundation.kill(process.processIdentifier, signal) }
    }

    /// SIGTERM, so the agent stops a QEMU it started itself; SIGKILL if it has not exited within
    /// `graceSeconds`. A SIGKILLed agent leaves its QEMU running (a host crash takes both), which
    /// in a test would keep burning one of the two cores through every later test.
    public func stop(graceSeconds: Double = 5) {
        kill(SIGTERM)
        let deadline = Date().addingTimeInterval(graceSeconds)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        kill(SIGKILL)
        process.waitUntilExit()
    }
}

