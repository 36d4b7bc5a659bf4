import CLibvirt
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// A libvirt C pointer that may cross to the worker thread of one call. libvirt's connection
/// and domain objects are thread-safe (reference counted, locked inside the library).
struct LibvirtHandle: @unchecked Sendable {
    let pointer: OpaquePointer
}

/// The state libvirt reports for a domain. `unknown` (libvirt's "no state", or a value this
/// code does not know) is never folded into `shutOff`: an agent that cannot tell must not act
/// as though the VM were down.
public enum LibvirtDomainState: Sendable, Equatable, CustomStringConvertible {
    case running
    case blocked
    case paused
    case shuttingDown
    case shutOff
    case crashed
    case pmSuspended
    /// libvirt returned VIR_DOMAIN_NOSTATE or a state number this code does not know.
    case unknown(raw: Int32)

    init(raw: Int32) {
        switch UInt32(bitPattern: raw) {
        case VIR_DOMAIN_RUNNING.rawValue: self = .running
        case VIR_DOMAIN_BLOCKED.rawValue: self = .blocked
        case VIR_DOMAIN_PAUSED.rawValue: self = .paused
        case VIR_DOMAIN_SHUTDOWN.rawValue: self = .shuttingDown
        case VIR_DOMAIN_SHUTOFF.rawValue: self = .shutOff
        case VIR_DOMAIN_CRASHED.rawValue: self = .crashed
        case VIR_DOMAIN_PMSUSPENDED.rawValue: self = .pmSuspended
        default: self = .unknown(raw: raw)
        }
    }

    /// True when a QEMU process exists for the domain (running, blocked, paused, shutting down,
    /// PM-suspended). False for shut off and crashed; nil when the state is unknown.
    public var hasProcess: Bool? {
        switch self {
        case .running, .blocked, .paused, .shuttingDown, .pmSuspended: return true
        case .shutOff, .crashed: return false
        case .unknown: return nil
        }
    }

    public var description: String {
        switch self {
        case .running: return "running"
        case .blocked: return "blocked"
        case .paused: return "paused"
        case .shuttingDown: return "shutting down"
        case .shutOff: return "shut off"
        case .crashed: return "crashed"
        case .pmSuspended: return "pm-suspended"
        case .unknown(let raw): return "unknown (libvirt state \(raw))"
        }
    }
}

/// Which XML of a domain to read.
public enum LibvirtXMLKind: Sendable {
    /// What the domain runs with now (for a shut-off domain libvirt returns its configuration).
    case live
    /// The persistent configuration, used at the next start (VIR_DOMAIN_XML_INACTIVE).
    case persistent
}

/// One domain looked up on a connection. Holds libvirt's domain reference until released.
public final class LibvirtDomain: @unchecked Sendable, CustomStringConvertible {
    public let name: String
    public let uuid: String
    let handle: LibvirtHandle
    /// Keeps the connection alive while the domain is in use.
    let connection: LibvirtConnection

    init(handle: LibvirtHandle, connection: LibvirtConnection) {
        self.handle = handle
        self.connection = connection
        // Both are answered from the local domain object (no RPC).
        self.name = virDomainGetName(handle.pointer).map { String(cString: $0) } ?? "?"
        var buf = [CChar](repeating: 0, count: Int(VIR_UUID_STRING_BUFLEN))
        self.uuid = virDomainGetUUIDString(handle.pointer, &buf) == 0
            ? buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) } : ""
    }

    deinit {
        // Only drops a reference inside the client library: no RPC, cannot hang.
        virDomainFree(handle.pointer)
    }

    public var description: String { "domain '\(name)' on \(connection.uri)" }
}

/// A connection to a libvirt daemon. Every call runs on its own worker thread and is bounded
/// by a timeout: libvirt calls can hang (a stuck daemon, a QEMU that no longer answers its
/// monitor). After a timeout the connection's `status` is `.unknown`, and the outcome of the
/// call that timed out is unknown too; nothing pretends it succeeded.
///
/// All methods block the calling thread; call them from threads, not from async contexts
/// that must stay responsive.
public final class LibvirtConnection: @unchecked Sendable {
    public enum Status: String, Sendable {
        case open
        /// A call timed out: the daemon or a domain's QEMU may be stuck, and whatever the call
        /// was doing may or may not have happened.
        case unknown
        case closed
    }

    public static let defaultURI = "qemu:///system"

    public let uri: String
    /// Default bound for every call, in seconds.
    public let timeout: Double

    private let lock = NSLock()
    private var handle: LibvirtHandle?
    private var _status: Status

    public var status: Status { lock.withLock { _status } }

    private init(uri: String, handle: LibvirtHandle, timeout: Double) {
        self.uri = uri
        self.handle = handle
        self.timeout = timeout
        self._status = .open
    }

    deinit {
        if let handle { virConnectClose(handle.pointer) }
    }

    /// Opens `uri`. `timeout` bounds this and every later call (seconds); a single call can
    /// pass its own. The first connection after libvirtd starts may take tens of seconds
    /// while libvirtd probes QEMU's capabilities: keep the default generous.
    public static func open(uri: String = defaultURI, readOnly: Bool = false, timeout: Double = 30) throws -> LibvirtConnection {
        LibvirtLibrary.initialize()
        let handle: LibvirtHandle = try LibvirtCall.run("virConnectOpen(\(uri))", timeout: timeout, onTimeout: {},
                                                        release: { virConnectClose($0.pointer) }) {
            let p = readOnly ? virConnectOpenReadOnly(uri) : virConnectOpen(uri)
            guard let p else {
                throw LibvirtCall.lastError(
                    "cannot connect to libvirt at \(uri)",
                    fix: "start the daemon (without systemd: `virtlogd -d; libvirtd -d`, after `apt-get install -y libvirt-daemon-system`) and check `virsh -c \(uri) list --all` works as this user")
            }
            return LibvirtHandle(pointer: p)
        }
        return LibvirtConnection(uri: uri, handle: handle, timeout: timeout)
    }

    /// Closes the connection. Domains looked up on it keep libvirt's connection object alive
    /// until they are released.
    public func close() throws {
        let h: LibvirtHandle? = lock.withLock {
            let h = handle
            handle = nil
            _status = .closed
            return h
        }
        guard let h else { return }
        try LibvirtCall.run("virConnectClose on \(uri)", timeout: timeout, onTimeout: {}) {
            if virConnectClose(h.pointer) < 0 { throw LibvirtCall.lastError("virConnectClose on \(self.uri) failed") }
        }
    }

    /// The hypervisor's version as libvirt reports it (virConnectGetVersion: QEMU's version
    /// for the qemu driver), e.g. "7.2.19".
    public func hypervisorVersion(timeout: Double? = nil) throws -> String {
        let uri = self.uri
        let v: UInt = try call("virConnectGetVersion", timeout: timeout) { conn in
            var version: UInt = 0
            if virConnectGetVersion(conn.pointer, &version) < 0 { throw LibvirtCall.lastError("cannot read the hypervisor version on \(uri)") }
            return version
        }
        return "\(v / 1_000_000).\(v / 1000 % 1000).\(v % 1000)"
    }

    // MARK: Domains

    /// The domain called `name`, or `.invalidArgument` naming the command that lists them.
    public func lookupDomain(named name: String, timeout: Double? = nil) throws -> LibvirtDomain {
        let uri = self.uri
        let h = try call("virDomainLookupByName(\(name))", timeout: timeout, release: LibvirtCall.freeDomain) { conn -> LibvirtHandle in
            guard let p = virDomainLookupByName(conn.pointer, name) else {
                if LibvirtCall.lastErrorCode == Int32(VIR_ERR_NO_DOMAIN.rawValue) {
                    throw GeminusError(.invalidArgument, "no domain named '\(name)' on \(uri)",
                                       fix: "`\(LibvirtConnection.virsh(uri)) list --all` shows the defined ones")
                }
                throw LibvirtCall.lastError("cannot look up domain '\(name)' on \(uri)")
            }
            return LibvirtHandle(pointer: p)
        }
        return LibvirtDomain(handle: h, connection: self)
    }

    /// Defines (or redefines) a persistent domain from XML. With `validate`, libvirt checks the
    /// XML against its schema first and names what is wrong.
    public func defineDomain(xml: String, validate: Bool = true, timeout: Double? = nil) throws -> LibvirtDomain {
        let flags: UInt32 = validate ? VIR_DOMAIN_DEFINE_VALIDATE.rawValue : 0
        let h = try call("virDomainDefineXMLFlags", timeout: timeout, release: LibvirtCall.freeDomain) { conn -> LibvirtHandle in
            guard let p = virDomainDefineXMLFlags(conn.pointer, xml, flags) else {
                throw LibvirtCall.lastError("libvirt refused the domain XML")
            }
            return LibvirtHandle(pointer: p)
        }
        return LibvirtDomain(handle: h, connection: self)
    }

    /// Starts a transient domain from XML (gone from libvirt once it stops), optionally paused.
    /// With the name and uuid of an inactive persistent domain, libvirt 9.0 starts that domain
    /// with this XML as its live definition and leaves the persistent one unchanged.
    public func createTransient(xml: String, paused: Bool = false, timeout: Double? = nil) throws -> LibvirtDomain {
        let flags = VIR_DOMAIN_START_VALIDATE.rawValue | (paused ? VIR_DOMAIN_START_PAUSED.rawValue : 0)
        let h = try call("virDomainCreateXML", timeout: timeout, release: LibvirtCall.freeDomain) { conn -> LibvirtHandle in
            guard let p = virDomainCreateXML(conn.pointer, xml, flags) else {
                throw LibvirtCall.lastError("libvirt could not start the transient domain")
            }
            return LibvirtHandle(pointer: p)
        }
        return LibvirtDomain(handle: h, connection: self)
    }

    /// Starts a defined domain (virDomainCreate), optionally paused.
    public func start(_ domain: LibvirtDomain, paused: Bool = false, timeout: Double? = nil) throws {
        let flags: UInt32 = paused ? VIR_DOMAIN_START_PAUSED.rawValue : 0
        try domainCall("virDomainCreateWithFlags", domain, timeout: timeout) { d in
            if virDomainCreateWithFlags(d.pointer, flags) < 0 { throw LibvirtCall.lastError("cannot start \(domain)") }
        }
    }

    /// Kills the domain's QEMU at once (virDomainDestroy); the guest gets no shutdown.
    public func destroy(_ domain: LibvirtDomain, timeout: Double? = nil) throws {
        try domainCall("virDomainDestroy", domain, timeout: timeout) { d in
            if virDomainDestroy(d.pointer) < 0 { throw LibvirtCall.lastError("cannot destroy \(domain)") }
        }
    }

    /// Removes the persistent definition (a running domain becomes transient).
    public func undefine(_ domain: LibvirtDomain, timeout: Double? = nil) throws {
        try domainCall("virDomainUndefine", domain, timeout: timeout) { d in
            if virDomainUndefine(d.pointer) < 0 { throw LibvirtCall.lastError("cannot undefine \(domain)") }
        }
    }

    /// The domain's XML: live (as running now) or persistent (the configuration).
    public func xml(of domain: LibvirtDomain, _ kind: LibvirtXMLKind = .live, timeout: Double? = nil) throws -> String {
        let flags: UInt32 = kind == .persistent ? VIR_DOMAIN_XML_INACTIVE.rawValue : 0
        return try domainCall("virDomainGetXMLDesc", domain, timeout: timeout) { d in
            guard let p = virDomainGetXMLDesc(d.pointer, flags) else {
                throw LibvirtCall.lastError("cannot read the XML of \(domain)")
            }
            defer { free(p) }
            return String(cString: p)
        }
    }

    /// The domain's state and libvirt's reason number for it (virDomainGetState).
    public func state(of domain: LibvirtDomain, timeout: Double? = nil) throws -> (state: LibvirtDomainState, reason: Int32) {
        try domainCall("virDomainGetState", domain, timeout: timeout) { d in
            var state: Int32 = 0, reason: Int32 = 0
            if virDomainGetState(d.pointer, &state, &reason, 0) < 0 {
                throw LibvirtCall.lastError("cannot read the state of \(domain)")
            }
            return (LibvirtDomainState(raw: state), reason)
        }
    }

    /// Whether the domain has a persistent definition (false for a transient domain).
    public func isPersistent(_ domain: LibvirtDomain, timeout: Double? = nil) throws -> Bool {
        try domainCall("virDomainIsPersistent", domain, timeout: timeout) { d in
            let r = virDomainIsPersistent(d.pointer)
            if r < 0 { throw LibvirtCall.lastError("cannot tell whether \(domain) is persistent") }
            return r == 1
        }
    }

    /// Whether the domain is running (has a QEMU process).
    public func isActive(_ domain: LibvirtDomain, timeout: Double? = nil) throws -> Bool {
        try domainCall("virDomainIsActive", domain, timeout: timeout) { d in
            let r = virDomainIsActive(d.pointer)
            if r < 0 { throw LibvirtCall.lastError("cannot tell whether \(domain) is active") }
            return r == 1
        }
    }

    /// Sends one QMP command (a JSON object) through libvirt's monitor passthrough
    /// (virDomainQemuMonitorCommand) and returns QEMU's reply JSON as is: a QMP
    /// `{"error": …}` reply is returned, not thrown. libvirt marks the domain
    /// "tainted: custom-monitor". About 20 ms a round trip; the epoch loop uses its own QMP socket.
    public func qemuMonitorCommand(_ domain: LibvirtDomain, _ json: String, timeout: Double? = nil) throws -> String {
        try domainCall("virDomainQemuMonitorCommand(\(LibvirtConnection.commandName(json)))", domain, timeout: timeout) { d in
            var result: UnsafeMutablePointer<CChar>? = nil
            if virDomainQemuMonitorCommand(d.pointer, json, &result, UInt32(VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT.rawValue)) < 0 {
                throw LibvirtCall.lastError("QMP command through libvirt failed for \(domain)")
            }
            guard let result else { return "" }
            defer { free(result) }
            return String(cString: result)
        }
    }

    /// The pid of the domain's QEMU, when libvirt's pid file for it is readable (the local
    /// system or session daemon, running as root or as the domain's owner) and names a live
    /// process whose command line carries `guest=<name>`. nil otherwise; no RPC.
    public func qemuPid(of domain: LibvirtDomain) -> Int32? {
        guard let dir = LibvirtConnection.pidDirectory(uri: uri) else { return nil }
        guard let text = try? String(contentsOfFile: "\(dir)/\(domain.name).pid", encoding: .utf8),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0,
              let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return nil }
        let args = cmd.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        let tag = "guest=\(domain.name)"
        guard args.contains(where: { $0 == tag || $0.hasPrefix(tag + ",") }) else { return nil }
        return pid
    }

    // MARK: Metadata (Geminus enrollment)

    /// Writes `element` (one XML element, without namespace) as the domain's metadata in
    /// `namespaceURI` with `prefix`, replacing what was there. Persistent configuration when the
    /// domain is persistent, and the live definition too when it runs.
    public func setMetadata(_ domain: LibvirtDomain, element: String?, prefix: String, namespaceURI: String, timeout: Double? = nil) throws {
        let flags = try metadataFlags(domain, timeout: timeout)
        try domainCall("virDomainSetMetadata", domain, timeout: timeout) { d in
            if virDomainSetMetadata(d.pointer, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), element,
                                    element == nil ? nil : prefix, namespaceURI, flags) < 0 {
                throw LibvirtCall.lastError("cannot write metadata \(namespaceURI) of \(domain)")
            }
        }
    }

    /// The metadata element in `namespaceURI` (persistent configuration if the domain is
    /// persistent, else the live one), or nil when there is none.
    public func metadata(_ domain: LibvirtDomain, namespaceURI: String, timeout: Double? = nil) throws -> String? {
        let persistent = try isPersistent(domain, timeout: timeout)
        let flags = persistent ? VIR_DOMAIN_AFFECT_CONFIG.rawValue : VIR_DOMAIN_AFFECT_LIVE.rawValue
        return try domainCall("virDomainGetMetadata", domain, timeout: timeout) { d -> String? in
            guard let p = virDomainGetMetadata(d.pointer, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), namespaceURI, flags) else {
                if LibvirtCall.lastErrorCode == Int32(VIR_ERR_NO_DOMAIN_METADATA.rawValue) { return nil }
                throw LibvirtCall.lastError("cannot read metadata \(namespaceURI) of \(domain)")
            }
            defer { free(p) }
            return String(cString: p)
        }
    }

    private func metadataFlags(_ domain: LibvirtDomain, timeout: Double?) throws -> UInt32 {
        let persistent = try isPersistent(domain, timeout: timeout)
        let active = try isActive(domain, timeout: timeout)
        var flags: UInt32 = 0
        if persistent { flags |= VIR_DOMAIN_AFFECT_CONFIG.rawValue }
        if active { flags |= VIR_DOMAIN_AFFECT_LIVE.rawValue }
        return flags
    }

    // MARK: Running calls

    /// Runs `body` with the connection on a worker thread, bounded by `timeout` (default:
    /// the connection's). A timeout marks the connection `.unknown`.
    func call<T>(_ what: String, timeout: Double?, release: (@Sendable (T) -> Void)? = nil,
                 _ body: @escaping @Sendable (LibvirtHandle) throws -> T) throws -> T {
        let h: LibvirtHandle? = lock.withLock { handle }
        guard let h else {
            throw GeminusError(.invalidArgument, "\(what): the libvirt connection to \(uri) is closed",
                               fix: "open a new connection")
        }
        return try LibvirtCall.run("\(what) on \(uri)", timeout: timeout ?? self.timeout, onTimeout: { [weak self] in
            self?.markUnknown()
        }, release: release) { try body(h) }
    }

    private func domainCall<T>(_ what: String, _ domain: LibvirtDomain, timeout: Double?, _ body: @escaping @Sendable (LibvirtHandle) throws -> T) throws -> T {
        let d = domain.handle
        return try withExtendedLifetime(domain) {
            try call("\(what) for '\(domain.name)'", timeout: timeout) { _ in try body(d) }
        }
    }

    private func markUnknown() {
        lock.withLock { if _status == .open { _status = .unknown } }
    }

    static func virsh(_ uri: String) -> String {
        uri == defaultURI ? "virsh" : "virsh -c \(uri)"
    }

    /// "query-status" out of `{"execute":"query-status", …}`, for error messages.
    static func commandName(_ json: String) -> String {
        guard let data = json.data(using: .utf8),
              let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let name = obj["execute"] as? String else { return "QMP" }
        return name
    }

    static func pidDirectory(uri: String) -> String? {
        switch uri {
        case "qemu:///system", "qemu+unix:///system": return "/run/libvirt/qemu"
        case "qemu:///session", "qemu+unix:///session":
            let home = ProcessInfo.processInfo.environment["XDG_CACHE_HOME"] ?? (NSHomeDirectory() + "/.cache")
            return home + "/libvirt/qemu/run"
        default: return nil
        }
    }
}

/// Process-wide libvirt setup.
enum LibvirtLibrary {
    private static let initialized: Bool = {
        _ = virInitialize()
        // libvirt's default handler prints every error to stderr; errors reach the operator
        // through GeminusError instead.
        virSetErrorFunc(nil) { _, _ in }
        return true
    }()

    static func initialize() { _ = initialized }
}

/// Bounded calls and libvirt's per-thread last error.
enum LibvirtCall {
    private final class Box<T>: @unchecked Sendable {
        let lock = NSLock()
        var result: Result<T, any Error>?
        var abandoned = false
        let done = DispatchSemaphore(value: 0)
    }

    /// Runs `body` on a new thread and waits at most `timeout` seconds. On timeout calls
    /// `onTimeout` and throws `.timeout` naming `what`; the thread is left to finish (or hang)
    /// on its own, and if it does finish, `release` gets its value (to close a connection or
    /// free a domain nobody will use).
    static func run<T>(_ what: String, timeout: Double, onTimeout: () -> Void,
                       release: (@Sendable (T) -> Void)? = nil,
                       _ body: @escaping @Sendable () throws -> T) throws -> T {
        let box = Box<T>()
        let thread = Thread {
            let r = Result { try body() }
            let late: Bool = box.lock.withLock {
                if box.abandoned { return true }
                box.result = r
                return false
            }
            if late {
                if case .success(let value) = r { release?(value) }
            } else {
                box.done.signal()
            }
        }
        thread.name = "libvirt-call"
        thread.start()
        if box.done.wait(timeout: .now() + timeout) == .timedOut {
            // The worker may have finished between the wait and now: then use its result.
            let finished: Result<T, any Error>? = box.lock.withLock {
                if let r = box.result { return r }
                box.abandoned = true
                return nil
            }
            if let finished { return try finished.get() }
            onTimeout()
            throw GeminusError(.timeout,
                               "libvirt call \(what) did not return within \(formatSeconds(timeout)); its outcome and the connection's state are unknown",
                               fix: "check that libvirtd is alive (`virsh list --all`) and that the domain's QEMU answers; then reconnect")
        }
        return try box.lock.withLock { box.result! }.get()
    }

    /// Frees a domain reference that arrived after its call timed out.
    static let freeDomain: @Sendable (LibvirtHandle) -> Void = { virDomainFree($0.pointer) }

    static func formatSeconds(_ s: Double) -> String {
        s < 1 ? "\(Int((s * 1000).rounded())) ms" : String(format: "%.1f s", s)
    }

    /// The calling thread's last libvirt error code (libvirt keeps it per thread: read it on
    /// the worker thread that made the call).
    static var lastErrorCode: Int32 {
        guard let e = virGetLastError() else { return 0 }
        return e.pointee.code
    }

    /// A `.hypervisor` error carrying libvirt's message for this thread's last error.
    static func lastError(_ context: String, fix: String? = nil) -> GeminusError {
        var detail = "no error detail from libvirt"
        if let e = virGetLastError() {
            if let m = e.pointee.message { detail = String(cString: m) }
            detail += " (libvirt error \(e.pointee.code))"
        }
        virResetLastError()
        return GeminusError(.hypervisor, "\(context): \(detail)", fix: fix)
    }
}
