import Foundation
import GeminusCore
import GeminusHA
#if canImport(Glibc)
import Glibc
#endif

/// What `geminus ha agent` writes for the other commands of this node (`ha status`, `ha add`,
/// `node spare`): the node's `HAStatus` plus how to reach this host. Rewritten atomically.
/// One flat JSON object (the status's keys beside the host's), read by scripts too.
@dynamicMemberLookup
public struct HAStatusFile: Codable, Sendable {
    public struct Host: Codable, Sendable {
        public var pid: Int32
        public var uri: String
        public var domainPrefix: String
        /// Wall clock: another process compares it with its own clock to see a stale file.
        public var updatedAtMillis: UInt64

        public init(pid: Int32, uri: String, domainPrefix: String, updatedAtMillis: UInt64) {
            self.pid = pid
            self.uri = uri
            self.domainPrefix = domainPrefix
            self.updatedAtMillis = updatedAtMillis
        }
    }

    public var host: Host
    public var status: HAStatus

    public init(host: Host, status: HAStatus) {
        self.host = host
        self.status = status
    }

    public subscript<T>(dynamicMember path: KeyPath<HAStatus, T>) -> T { status[keyPath: path] }
    public subscript<T>(dynamicMember path: KeyPath<Host, T>) -> T { host[keyPath: path] }

    public init(from decoder: any Decoder) throws {
        host = try Host(from: decoder)
        status = try HAStatus(from: decoder)
    }

    public func encode(to encoder: any Encoder) throws {
        try host.encode(to: encoder)
        try status.encode(to: encoder)
    }

    public static func path(stateDir: String) -> String { stateDir + "/status.json" }
    public static func requestsDir(stateDir: String) -> String { stateDir + "/requests" }

    public func encoded() throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .prettyPrinted]
        return try e.encode(self)
    }

    /// The agent's status, or an error saying how to get one.
    public static func read(stateDir: String, maxAgeMillis: UInt64 = 5000) throws -> HAStatusFile {
        let p = path(stateDir: stateDir)
        guard let data = FileManager.default.contents(atPath: p) else {
            throw GeminusError(.connectionFailed, "the HA agent is not running on this node (no \(p))",
                               fix: "start it: `geminus ha agent --state-dir \(stateDir) …` (docs/HA.md), or pass the --state-dir it uses")
        }
        let s: HAStatusFile
        do { s = try JSONDecoder().decode(HAStatusFile.self, from: data) } catch {
            throw GeminusError(.io, "\(p) does not parse: \(error)", fix: "restart `geminus ha agent`")
        }
        let age = WallClock.micros() / 1000 &- s.host.updatedAtMillis
        if age > maxAgeMillis || kill(s.host.pid, 0) != 0 {
            throw GeminusError(.connectionFailed, "the HA agent of this node is not running (its status in \(p) is \(age / 1000) s old, pid \(s.host.pid))",
                               fix: "start it again: `geminus ha agent --state-dir \(stateDir) …`")
        }
        return s
    }
}

/// An operator's request to the agent (a file in STATE_DIR/requests, consumed by the agent).
public struct HARequest: Codable, Sendable {
    public var spareNode: String
    public var on: Bool

    public init(spareNode: String, on: Bool) {
        self.spareNode = spareNode
        self.on = on
    }

    /// Hands the request to the agent of `stateDir` (it reads the directory within 200 ms).
    public func submit(stateDir: String) throws {
        let path = HAStatusFile.requestsDir(stateDir: stateDir) + "/spare-\(UUID().uuidString).json"
        try JSONEncoder().encode(self).write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}
