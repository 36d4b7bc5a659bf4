import Foundation
import GeminusCore
import GeminusHA
import Logging

/// The HA agent's log lines on stderr: `SECONDS.MILLIS NODE [LEVEL: ]MESSAGE`. Wall-clock
/// seconds with milliseconds, because the lab test (`Tools/ha-cluster-test`) lines the agents'
/// lines up with its own clock to measure detection, fencing and start times; swift-log's
/// `StreamLogHandler` stamps whole seconds only.
public struct HALogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    /// Metadata key of the node's name (the first word after the stamp).
    public static let nodeKey = "node"

    public init(logLevel: Logger.Level = .info) {
        self.logLevel = logLevel
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let stamp = String(format: "%.3f", Double(WallClock.micros()) / 1_000_000)
        let node = (event.metadata?[Self.nodeKey] ?? metadata[Self.nodeKey]).map { "\($0) " } ?? ""
        let level = event.level == .info || event.level == .notice ? "" : "\(event.level): "
        FileHandle.standardError.write(Data("\(stamp) \(node)\(level)\(event.message)\n".utf8))
    }
}

extension HALogLevel {
    public var loggerLevel: Logger.Level {
        switch self {
        case .info: .info
        case .warning: .warning
        case .error: .error
        }
    }
}
