import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// An asynchronous QMP event QEMU sent between replies (kept for inspection, bounded).
public struct QMPEvent: Sendable, CustomStringConvertible {
    public let name: String
    /// The whole event line as QEMU sent it (JSON).
    public let json: String
    public var description: String { json }
}

/// Why the last failed QMP call failed, as far as the transport can tell. A timeout means
/// "unknown" (QEMU may be stuck, slow, or the command may still complete); `closed` means QEMU
/// is gone (EOF or a broken socket). Callers that decide failover must keep the two apart.
public enum QMPLinkState: String, Sendable {
    case connected
    /// The last call timed out: QEMU's state is unknown. A late reply is recognised by its id
    /// and discarded, so the connection stays usable.
    case unknown
    /// EOF or a socket error: QEMU closed the monitor (normally because it exited).
    case closed
}

/// A client for QEMU's QMP monitor over a unix socket: one JSON object per line, one command
/// at a time, every call bounded by a timeout. Thread-safe (calls are serialised).
public final class QMPClient: @unchecked Sendable {
    public let socketPath: String
    public let defaultTimeout: Double
    public static let eventLimit = 64

    private let lock = NSLock()
    private var fd: Int32 = -1
    private var readBuffer: [UInt8] = []
    private var nextID: UInt64 = 1
    private var _events: [QMPEvent] = []
    private var _state: QMPLinkState = .connected
    /// The greeting's "QMP" object (version, capabilities) as JSON.
    public private(set) var greeting: String = ""

    /// Connects (retrying while QEMU creates the socket, up to `connectTimeout` seconds), checks
    /// that `peer` is at the other end (the QEMU the caller started or looked up: a QMP that
    /// answers `stop` without stopping would make every checkpoint inconsistent), reads the
    /// greeting and leaves capabilities negotiation mode.
    public init(socketPath: String, connectTimeout: Double = 5, defaultTimeout: Double = 2,
                peer: SocketPeer = .sameUser) throws(GeminusError) {
        self.socketPath = socketPath
        self.defaultTimeout = defaultTimeout
        let deadline = Monotonic.nanos() + UInt64(connectTimeout * 1e9)
        fd = try UnixSocket.connect(path: socketPath, timeout: connectTimeout, what: "QMP socket",
                                    fix: "check that QEMU is running with -qmp unix:\(socketPath),server=on,wait=off", peer: peer)
        do throws(GeminusError) {
            let remaining = max(0.2, Double(deadline &- Monotonic.nanos()) / 1e9)
            let line = try readLine(deadline: Monotonic.nanos() + UInt64(min(remaining, max(defaultTimeout, 1)) * 1e9), what: "greeting")
            guard let obj = Self.parse(line), obj["QMP"] != nil else {
                throw GeminusError(.protocolMismatch, "QMP socket \(socketPath) sent no QMP greeting: \(line.prefix(200))")
            }
            greeting = line
            _ = try execute("qmp_capabilities")
        } catch {
            Glibc.close(fd)
            fd = -1
            throw error
        }
    }

    deinit { if fd >= 0 { Glibc.close(fd) } }

    public var state: QMPLinkState { lock.lock(); defer { lock.unlock() }; return _state }
    /// The last `eventLimit` events, oldest first.
    public var events: [QMPEvent] { lock.lock(); defer { lock.unlock() }; return _events }

    public func close() {
        lock.lock()
        defer { lock.unlock() }
        if fd >= 0 { Glibc.close(fd); fd = -1 }
        _state = .closed
    }

    /// Runs one command and returns its "return" value (a dictionary, array, or empty dictionary).
    /// QMP errors become `.hypervisor` errors "QMP <cmd> failed: <class>: <desc>"; a timeout
    /// is `.timeout` (state `.unknown`); EOF is `.hypervisor` "QEMU closed the QMP connection"
    /// (state `.closed`).
    @discardableResult
    public func execute(_ command: String, arguments: [String: Any]? = nil, timeout: Double? = nil) throws(GeminusError) -> Any {
        try execute(command, arguments: arguments, passing: nil, timeout: timeout)
    }

    /// `execute`, passing the file descriptor `descriptor` (SCM_RIGHTS) with the command, as `getfd`
    /// and `add-fd` expect. The caller keeps its own copy and closes it.
    @discardableResult
    public func execute(_ command: String, arguments: [String: Any]?, passing descriptor: Int32?, timeout: Double? = nil) throws(GeminusError) -> Any {
        lock.lock()
        defer { lock.unlock() }
        guard fd >= 0 else {
            throw GeminusError(.hypervisor, "QMP \(command) failed: the QMP connection to \(socketPath) is closed")
        }
        let id = nextID
        nextID += 1
        var message: [String: Any] = ["execute": command, "id": id]
        if let arguments { message["arguments"] = arguments }
        let data: Data
        do {
            data = try JSONSerialization.data(withJSONObject: message)
        } catch {
            throw GeminusError(.invalidArgument, "QMP \(command): arguments are not JSON: \(error)")
        }
        let deadline = Monotonic.nanos() + UInt64((timeout ?? defaultTimeout) * 1e9)
        if let descriptor {
            try sendWithDescriptor(Array(data) + [0x0A], descriptor: descriptor, command: command)
        } else {
            try send(Array(data) + [0x0A], command: command)
        }
        while true {
            let line = try readLine(deadline: deadline, what: command)
            guard let obj = Self.parse(line) else { continue }
            if let name = obj["event"] as? String {
                if _events.count >= Self.eventLimit { _events.removeFirst(_events.count - Self.eventLimit + 1) }
                _events.append(QMPEvent(name: name, json: line))
                continue
            }
            // A late reply to an earlier, timed-out command carries an older id: drop it.
            if let replyID = (obj["id"] as? NSNumber)?.uint64Value, replyID != id { continue }
            if let ret = obj["return"] {
                _state = .connected
                return ret
            }
            if let err = obj["error"] as? [String: Any] {
                _state = .connected
                let cls = err["class"] as? String ?? "?"
                let desc = err["desc"] as? String ?? "?"
                throw GeminusError(.hypervisor, "QMP \(command) failed: \(cls): \(desc)")
            }
        }
    }

    /// The QMP error class and description of a `.hypervisor` error from `execute`, if any.
    public static func qmpErrorDescription(_ error: GeminusError) -> String? {
        guard error.code == .hypervisor, let r = error.message.range(of: " failed: ") else { return nil }
        return String(error.message[r.upperBound...])
    }

    // MARK: - Socket

    private func send(_ bytes: [UInt8], command: String) throws(GeminusError) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                _state = .closed
                throw GeminusError(.hypervisor, "QMP \(command) failed: QEMU closed the QMP connection (\(String(cString: strerror(errno))))",
                                   fix: "QEMU has exited; check its log")
            }
            offset += n
        }
    }

    /// Sends the whole message in one sendmsg carrying `descriptor` (QMP messages are small).
    private func sendWithDescriptor(_ bytes: [UInt8], descriptor: Int32, command: String) throws(GeminusError) {
        // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } + one int, padded.
        let headerSize = MemoryLayout<Int>.size + 2 * MemoryLayout<Int32>.size
        let controlSize = (headerSize + MemoryLayout<Int32>.size + 7) & ~7
        var control = [UInt8](repeating: 0, count: controlSize)
        control.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: headerSize + MemoryLayout<Int32>.size, toByteOffset: 0, as: Int.self)
            raw.storeBytes(of: SOL_SOCKET, toByteOffset: MemoryLayout<Int>.size, as: Int32.self)
            raw.storeBytes(of: Int32(SCM_RIGHTS), toByteOffset: MemoryLayout<Int>.size + 4, as: Int32.self)
            raw.storeBytes(of: descriptor, toByteOffset: headerSize, as: Int32.self)
        }
        var payload = bytes
        let n = payload.withUnsafeMutableBytes { data in
            control.withUnsafeMutableBytes { ctl in
                var iov = iovec(iov_base: data.baseAddress, iov_len: data.count)
                return withUnsafeMutablePointer(to: &iov) { iovp in
                    var msg = msghdr()
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    msg.msg_control = ctl.baseAddress
                    msg.msg_controllen = ctl.count
                    return sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
                }
            }
        }
        if n < 0 {
            _state = .closed
            throw GeminusError(.hypervisor, "QMP \(command) failed: QEMU closed the QMP connection (\(String(cString: strerror(errno))))",
                               fix: "QEMU has exited; check its log")
        }
        if n < bytes.count { try send(Array(bytes[n...]), command: command) }
    }

    private func readLine(deadline: UInt64, what: String) throws(GeminusError) -> String {
        while true {
            if let nl = readBuffer.firstIndex(of: 0x0A) {
                let line = String(decoding: readBuffer[..<nl], as: UTF8.self)
                readBuffer.removeSubrange(...nl)
                if line.allSatisfy({ $0.isWhitespace }) { continue }
                return line
            }
            let now = Monotonic.nanos()
            guard now < deadline else {
                _state = .unknown
                throw GeminusError(.timeout, "QMP \(what) timed out on \(socketPath): QEMU's state is unknown",
                                   fix: "QEMU may be overloaded or hung; it has not closed the connection")
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ms = Int32(min(UInt64(Int32.max), (deadline - now + 999_999) / 1_000_000))
            let r = poll(&pfd, 1, ms)
            if r < 0 {
                if errno == EINTR { continue }
                throw GeminusError(.io, "poll on QMP socket failed: \(String(cString: strerror(errno)))")
            }
            if r == 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                _state = .closed
                let reason = n == 0 ? "EOF" : String(cString: strerror(errno))
                throw GeminusError(.hypervisor, "QMP \(what) failed: QEMU closed the QMP connection (\(reason))",
                                   fix: "QEMU has exited; check its log")
            }
            readBuffer.append(contentsOf: chunk[..<n])
        }
    }

    static func parse(_ line: String) -> [String: Any]? {
        guard let data = line.data(using: .utf8),
              let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return nil }
        return obj
    }
}
