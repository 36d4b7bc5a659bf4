import Foundation
import GeminusCore
import GeminusNode
import GeminusTransport
import Logging

/// The peer-link seam over a `FramedConnection` (TCP, authenticated handshake done).
final class FramedPeerLink: PeerLink {
    let connection: FramedConnection
    private let sendTimeout: Duration
    /// A frame (or the break) that `waitForInput` met, handed out by the next `receive`.
    private var waiting: LinkInput?

    init(_ connection: FramedConnection, sendTimeoutMillis: Int) {
        self.connection = connection
        sendTimeout = .milliseconds(sendTimeoutMillis)
    }

    var remoteAddress: String { connection.remoteAddress }
    var peerHoldsCheckpoint: Bool { connection.peer.role == .secondary && connection.peer.committedEpoch != .none }
    var lastHeardNanos: UInt64 { connection.lastHeardNanos }

    func send(_ frame: [UInt8]) throws(GeminusError) {
        try connection.send(frame, timeout: sendTimeout)
    }

    func receive() -> LinkInput {
        if let w = waiting {
            waiting = nil
            return w
        }
        return read(timeout: .zero)
    }

    func waitForInput(maxNanos: UInt64) {
        guard waiting == nil else { return }
        let input = read(timeout: .nanoseconds(Int64(maxNanos)))
        if case .idle = input { return }
        waiting = input
    }

    private func read(timeout: Duration) -> LinkInput {
        do {
            guard let frame = try connection.receive(timeout: timeout) else { return .idle }
            return .frame(frame)
        } catch {
            return .broken(reason: "\(error)", corruptEpoch: connection.closeReason?.corruptEpoch)
        }
    }

    func flush(maxNanos: UInt64) {
        try? connection.flush(timeout: .nanoseconds(Int64(maxNanos)))
    }

    func close() { connection.close() }
}

/// The dialer seam over the background `Dialer`.
final class TCPPeerDialer: PeerDialer {
    private let dialer: Dialer
    private let sendTimeoutMillis: Int

    init(_ dialer: Dialer, sendTimeoutMillis: Int) {
        self.dialer = dialer
        self.sendTimeoutMillis = sendTimeoutMillis
        dialer.start()
    }

    func take() -> (any PeerLink)? { dialer.take().map { FramedPeerLink($0, sendTimeoutMillis: sendTimeoutMillis) } }
    func redial() { dialer.reconnect() }
    func stop() { dialer.stop() }
}

/// The node's events as the agent says them: a swift-log line at the event's level, and the
/// named ones on the JSON event stream.
final class AgentEventSink: NodeEventSink, @unchecked Sendable {
    private let logger: Logger
    private let events: EventLog
    /// Extra handling of some events (switchover results, status), set by the agent.
    var also: (@Sendable (NodeEvent) -> Void)?

    init(logger: Logger, events: EventLog) {
        self.logger = logger
        self.events = events
    }

    func record(_ event: NodeEvent) {
        let level: Logger.Level
        switch event.level {
        case .trace: level = .trace
        case .debug: level = .debug
        case .info: level = .info
        case .notice: level = .notice
        case .warning: level = .warning
        case .error: level = .error
        case .critical: level = .critical
        }
        logger.log(level: level, "\(event.message)")
        events.emit(event)
        also?(event)
    }
}
