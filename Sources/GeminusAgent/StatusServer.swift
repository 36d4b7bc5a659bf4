import Foundation
import GeminusCore

/// The latest status of an agent, as `geminus status` reads it: the same fields as the
/// `progress` event, plus the role and VM. Updated by the agent's loop, read by the server.
public final class AgentStatus: @unchecked Sendable {
    private let lock = NSLock()
    private var fields: [String: Any] = [:]

    public init() {}

    public func update(_ new: [String: Any]) {
        lock.lock()
        for (k, v) in new { fields[k] = v }
        lock.unlock()
    }

    var role: String? { lock.withLock { fields["role"] as? String } }

    public var json: Data {
        lock.lock()
        defer { lock.unlock() }
        return (try? JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys])) ?? Data("{}".utf8)
    }
}

/// The agent's control socket. A client writes one request line, `status` or `switchover`,
/// and reads one JSON line back; a client that writes nothing gets the status. The socket is
/// owner-only (created so, not chmod-ed after): status shows what is protected where, and a
/// switchover moves the VM. Its directory stays traversable: QEMU's unprivileged user reaches
/// the private QMP sockets in /run/geminus/qmp through it.
public final class StatusServer: @unchecked Sendable {
    public enum Request: String, Sendable {
        case status, switchover
    }
    public static let defaultDirectory = "/run/geminus"
    public let path: String
    private let fd: Int32
    private let status: AgentStatus
    private let lock = NSLock()
    private var switchoverHandler: (@Sendable () -> SwitchoverResult)?

    /// One socket per VM and host, whatever the agent's role: a switchover swaps roles.
    public static func defaultPath(vm: String) -> String { "\(defaultDirectory)/\(vm).sock" }

    /// What a `switchover` request runs (on its own thread); nil refuses it (not a primary).
    public func onSwitchover(_ handler: (@Sendable () -> SwitchoverResult)?) {
        lock.withLock { switchoverHandler = handler }
    }

    public init(path: String, status: AgentStatus) throws(GeminusError) {
        self.path = path
        self.status = status
        let dir = (path as NSString).deletingLastPathComponent
        if mkdir(dir, 0o755) != 0 && errno != EEXIST {
            throw GeminusError(.io, "cannot create the status socket's directory \(dir): \(String(cString: strerror(errno)))",
                               fix: "run the agent as root (for \(StatusServer.defaultDirectory)), or give it a --status-socket in a directory it may write")
        }
        guard var addr = unixSocketAddress(path) else {
            throw GeminusError(.invalidArgument, "status socket path \(path) is too long for a unix socket", fix: "choose a shorter --status-socket")
        }
        // A socket file left by an agent that died is in the way; one that answers is not ours
        // to take.
        if StatusServer.query(path: path, timeoutMillis: 200) != nil {
            throw GeminusError(.addressInUse, "another agent answers on \(path)",
                               fix: "stop that agent, or give this one another --status-socket")
        }
        unlink(path)
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw GeminusError(.io, "cannot create the status socket: \(String(cString: strerror(errno)))") }
        // bind gives the file the socket's own mode (less the umask): 0600 set on the socket
        // first, so the file is owner-only from its first instant, without changing the umask
        // of the whole process (other threads create files meanwhile).
        let ok = fchmod(fd, 0o600) == 0 && withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
        guard ok, listen(fd, 8) == 0 else {
            let e = String(cString: strerror(errno))
            Glibc.close(fd)
            throw GeminusError(.io, "cannot listen on status socket \(path): \(e)", fix: "check that \(dir) is writable by this agent")
        }
        let t = Thread { [self] in serve() }
        t.name = "geminus-status"
        t.start()
    }

    public func close() {
        shutdown(fd, Int32(SHUT_RDWR))
        Glibc.close(fd)
        unlink(path)
    }

    private func serve() {
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            switch Self.readRequest(client) {
            case .switchover:
                let handler = lock.withLock { switchoverHandler }
                // A switchover takes seconds; status requests keep being answered meanwhile.
                let t = Thread { [status] in
                    let result = handler?() ?? SwitchoverResult(ok: false, message: "this agent is not running the VM (\(status.role ?? "starting")): ask the primary's agent")
                    Self.reply(client, (try? JSONSerialization.data(withJSONObject: result.json, options: [.sortedKeys])) ?? Data("{}".utf8))
                }
                t.name = "geminus-switchover"
                t.start()
            case .status, nil:
                Self.reply(client, status.json)
            }
        }
    }

    private static func reply(_ client: Int32, _ json: Data) {
        var data = json
        data.append(10)
        _ = data.withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        Glibc.close(client)
    }

    /// The request line, waiting briefly: an old client writes nothing and means `status`.
    private static func readRequest(_ client: Int32) -> Request? {
        var tv = timeval(tv_sec: 0, tv_usec: 200_000)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 64, recv(client, &byte, 1, 0) == 1, byte != 10 { line.append(byte) }
        return Request(rawValue: String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespaces))
    }

    /// Sends `request` to one agent and reads its JSON answer, or nil if nothing answers in time.
    public static func query(path: String, request: Request = .status, timeoutMillis: Int = 1000) -> [String: Any]? {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var tv = timeval(tv_sec: timeoutMillis / 1000, tv_usec: (timeoutMillis % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard var addr = unixSocketAddress(path) else { return nil }
        let connected = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
        guard connected else { return nil }
        let line = Array((request.rawValue + "\n").utf8)
        guard send(fd, line, line.count, Int32(MSG_NOSIGNAL)) == line.count else { return nil }
        var data = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        while data.count < 1 << 20 {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            data.append(contentsOf: buf[0..<n])
        }
        return try? JSONSerialization.jsonObject(with: data) as? [String: Any]
    }
}
