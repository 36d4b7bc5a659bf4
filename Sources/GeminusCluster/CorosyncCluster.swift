import CCorosync
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// The cluster seam on a running Corosync (3.x): one CPG group for membership and published
/// states, the quorum service for quorate/not, cmap for node names.
///
/// One dispatch thread polls Corosync's two descriptors and feeds a bounded `ClusterEventQueue`.
/// Every other call into the libraries runs on a worker thread bounded by `callTimeoutMillis`:
/// a stuck Corosync makes a call fail with `.timeout`, never hangs the caller.
///
/// Membership is the CPG group's: a node is a member while its Geminus process is in the group.
/// A node whose process died but whose Corosync runs leaves with `.processDown`.
public final class CorosyncCluster: Cluster, @unchecked Sendable {
    public let localNode: ClusterNode
    public let groupName: String
    public let callTimeoutMillis: Int

    private let queue: ClusterEventQueue
    private let lock = NSLock()
    private var cpgHandle: cpg_handle_t = 0
    private var quorumHandle: quorum_handle_t = 0
    private var names: [ClusterNodeID: String]
    private var _quorum = QuorumState(quorate: false, changedAtMillis: Monotonic.nanos() / 1_000_000)
    private var closed = false
    private var dispatchThread: Thread?
    /// Keeps `self` alive while Corosync holds it as a callback context.
    private var retainedSelf: Unmanaged<CorosyncCluster>?

    public var quorum: QuorumState { lock.withLock { _quorum } }
    public var stats: ClusterStats { queue.stats }

    /// Connects to the Corosync of this network namespace and joins `groupName`.
    public init(groupName: String = "geminus-ha", callTimeoutMillis: Int = 5000, queueLimit: Int = ClusterLimits.eventQueueLimit) throws {
        precondition(groupName.utf8.count < Int(CPG_MAX_NAME_LENGTH), "CPG group names are shorter than \(CPG_MAX_NAME_LENGTH) bytes")
        self.groupName = groupName
        self.callTimeoutMillis = callTimeoutMillis
        self.queue = ClusterEventQueue(limit: queueLimit)

        let handles: (cpg_handle_t, quorum_handle_t, ClusterNodeID, [ClusterNodeID: String]) = try BoundedCall.run("connect to corosync", timeoutMillis: callTimeoutMillis) {
            var cpg: cpg_handle_t = 0
            var callbacks = cpg_callbacks_t(cpg_deliver_fn: corosyncDeliver, cpg_confchg_fn: corosyncConfchg)
            let rc = cpg_initialize(&cpg, &callbacks)
            guard rc == CS_OK else { throw CorosyncCluster.notRunning("cpg_initialize", rc) }
            var local: UInt32 = 0
            let lrc = cpg_local_get(cpg, &local)
            guard lrc == CS_OK else { cpg_finalize(cpg); throw CorosyncCluster.failure("cpg_local_get", lrc) }
            var q: quorum_handle_t = 0
            var qcallbacks = quorum_callbacks_t(quorum_notify_fn: corosyncQuorum)
            var qtype: UInt32 = 0
            let qrc = quorum_initialize(&q, &qcallbacks, &qtype)
            guard qrc == CS_OK else { cpg_finalize(cpg); throw CorosyncCluster.notRunning("quorum_initialize", qrc) }
            guard qtype == 1 else {
                quorum_finalize(q); cpg_finalize(cpg)
                throw GeminusError(.invalidArgument, "corosync runs without a quorum provider, so no partition can be told to stop",
                                   fix: "add `quorum { provider: corosync_votequorum }` to corosync.conf and restart corosync")
            }
            return (cpg, q, local, CorosyncCluster.readNodeNames())
        }
        cpgHandle = handles.0
        quorumHandle = handles.1
        names = handles.3
        localNode = ClusterNode(id: handles.2, name: handles.3[handles.2] ?? "node\(handles.2)")

        let context = Unmanaged.passRetained(self)
        retainedSelf = context
        let cpg = cpgHandle, q = quorumHandle, group = groupName
        do {
            try BoundedCall.run("join CPG group \(groupName)", timeoutMillis: callTimeoutMillis) {
                var rc = cpg_context_set(cpg, context.toOpaque())
                guard rc == CS_OK else { throw CorosyncCluster.failure("cpg_context_set", rc) }
                rc = quorum_context_set(q, context.toOpaque())
                guard rc == CS_OK else { throw CorosyncCluster.failure("quorum_context_set", rc) }
                var name = CorosyncCluster.cpgName(group)
                rc = cpg_join(cpg, &name)
                guard rc == CS_OK else {
                    throw GeminusError(.connectionFailed, "cannot join the CPG group '\(group)': \(CorosyncCluster.describe(rc))",
                                       fix: rc == CS_ERR_EXIST ? "another process of this node is already in the group: stop the other `geminus ha agent`" : "check `corosync-cpgtool` and corosync's log")
                }
                rc = quorum_trackstart(q, UInt32(CS_TRACK_CHANGES | CS_TRACK_CURRENT))
                guard rc == CS_OK else { throw CorosyncCluster.failure("quorum_trackstart", rc) }
            }
        } catch {
            context.release()
            retainedSelf = nil
            cpg_finalize(cpg)
            quorum_finalize(q)
            throw error
        }
        let thread = Thread { [unowned self] in self.dispatchLoop() }
        thread.name = "corosync-dispatch"
        dispatchThread = thread
        thread.start()
    }

    deinit {
        // close() releases the context; a cluster never closed stays alive through it, so
        // deinit only runs after close.
    }

    public func nextEvent(timeoutMillis: Int) throws -> ClusterEvent? {
        try queue.pop(timeoutMillis: timeoutMillis)
    }

    public func publish(_ state: [UInt8]) throws {
        guard state.count <= ClusterLimits.publishMaxBytes else {
            throw GeminusError(.resourceExhausted, "published state of \(state.count) bytes exceeds the \(ClusterLimits.publishMaxBytes)-byte limit",
                               fix: "protect fewer VMs on this node or report less per VM")
        }
        let cpg: cpg_handle_t = try lock.withLock {
            if closed { throw GeminusError(.connectionFailed, "the cluster connection is closed") }
            return cpgHandle
        }
        let queue = self.queue
        try BoundedCall.run("publish to CPG", timeoutMillis: callTimeoutMillis) {
            // Corosync's flow control answers TRY_AGAIN while its queue drains: wait briefly,
            // a bounded number of times.
            for attempt in 0..<200 {
                let rc: cs_error_t = state.withUnsafeBytes { raw in
                    var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count)
                    return cpg_mcast_joined(cpg, CPG_TYPE_AGREED, &iov, 1)
                }
                if rc == CS_OK { return }
                guard rc == CS_ERR_TRY_AGAIN, attempt < 199 else { throw CorosyncCluster.failure("cpg_mcast_joined", rc) }
                queue.noteRetry()
                Monotonic.sleep(nanos: 10_000_000)
            }
        }
    }

    public func close() {
        let wasOpen: Bool = lock.withLock {
            defer { closed = true }
            return !closed
        }
        guard wasOpen else { return }
        queue.fail(GeminusError(.connectionFailed, "the cluster connection was closed"))
        // The dispatch thread notices `closed` within one poll interval and finalizes.
    }

    // MARK: Dispatch

    private func dispatchLoop() {
        let cpg = cpgHandle, q = quorumHandle
        var cpgFD: Int32 = -1, quorumFD: Int32 = -1
        if cpg_fd_get(cpg, &cpgFD) != CS_OK || quorum_fd_get(q, &quorumFD) != CS_OK {
            queue.fail(GeminusError(.connectionFailed, "cannot get corosync's descriptors", fix: "restart corosync and the agent"))
        } else {
            while !lock.withLock({ closed }) {
                var fds = [pollfd(fd: cpgFD, events: Int16(POLLIN), revents: 0), pollfd(fd: quorumFD, events: Int16(POLLIN), revents: 0)]
                // 100 ms: how late a close() is noticed; events wake the poll at once.
                let n = poll(&fds, 2, 100)
                if n < 0 && errno == EINTR { continue }
                if n < 0 { queue.fail(GeminusError(.io, "poll on corosync's descriptors failed: errno \(errno)")); break }
                if fds[0].revents != 0, cpg_dispatch(cpg, CS_DISPATCH_ALL) != CS_OK {
                    queue.fail(Self.lost)
                    break
                }
                if fds[1].revents != 0, quorum_dispatch(q, CS_DISPATCH_ALL) != CS_OK {
                    queue.fail(Self.lost)
                    break
                }
                if (fds[0].revents | fds[1].revents) & Int16(POLLHUP | POLLERR) != 0 {
                    queue.fail(Self.lost)
                    break
                }
            }
        }
        var name = Self.cpgName(groupName)
        _ = cpg_leave(cpg, &name)
        cpg_finalize(cpg)
        quorum_finalize(q)
        lock.withLock { closed = true }
        retainedSelf?.release()
    }

    static let lost = GeminusError(.connectionFailed, "lost the connection to corosync (it stopped or restarted)",
                                   fix: "this node is now outside the cluster and must not run HA VMs; start corosync again, then the agent")

    fileprivate func onConfchg(members: [cpg_address], left: [cpg_address], joined: [cpg_address]) {
        var seen: [UInt32] = members.map(\.nodeid)
        seen += joined.map(\.nodeid)
        seen += left.map(\.nodeid)
        let known = lock.withLock { names }
        if seen.contains(where: { known[$0] == nil }) {
            // A node added to corosync.conf after we started: its name is in cmap now.
            let fresh = Self.readNodeNames()
            lock.withLock { names.merge(fresh) { $1 } }
        }
        func node(_ id: UInt32) -> ClusterNode { ClusterNode(id: id, name: lock.withLock { names[id] } ?? "node\(id)") }
        // One Geminus process per node; CPG lists processes, so fold them into nodes.
        let memberIDs = Set(members.map(\.nodeid))
        let m = ClusterMembership(
            members: memberIDs.sorted().map(node),
            joined: Set(joined.map(\.nodeid)).sorted().map(node),
            left: Set(left.map(\.nodeid)).subtracting(memberIDs).sorted().map { id in
                let reason = left.first { $0.nodeid == id }.map { Self.reason($0.reason) } ?? .unknown
                return ClusterDeparture(node: node(id), reason: reason)
            })
        queue.push(.membership(m))
    }

    fileprivate func onDeliver(from nodeID: UInt32, bytes: [UInt8]) {
        let name = lock.withLock { names[nodeID] } ?? "node\(nodeID)"
        queue.push(.published(from: ClusterNode(id: nodeID, name: name), state: bytes))
    }

    fileprivate func onQuorum(quorate: Bool, view: [ClusterNodeID]) {
        let state: QuorumState? = lock.withLock {
            let sortedView = view.sorted()
            if _quorum.quorate == quorate && _quorum.memberIDs == sortedView && quorateSeen { return nil }
            // The time says when quorate/not changed; a new view alone keeps it.
            let changed = !quorateSeen || _quorum.quorate != quorate
            quorateSeen = true
            _quorum = QuorumState(quorate: quorate, changedAtMillis: changed ? Monotonic.nanos() / 1_000_000 : _quorum.changedAtMillis,
                                  memberIDs: sortedView)
            return _quorum
        }
        if let state { queue.push(.quorum(state)) }
    }
    private var quorateSeen = false

    // MARK: Helpers

    static func reason(_ r: UInt32) -> ClusterLeaveReason {
        switch r {
        case CPG_REASON_LEAVE.rawValue: return .left
        case CPG_REASON_PROCDOWN.rawValue: return .processDown
        case CPG_REASON_NODEDOWN.rawValue: return .nodeDown
        default: return .unknown
        }
    }

    static func cpgName(_ s: String) -> cpg_name {
        var name = cpg_name()
        let bytes = Array(s.utf8)
        name.length = UInt32(bytes.count)
        withUnsafeMutableBytes(of: &name.value) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return name
    }

    /// Corosync's effective totem timeouts as this node's Corosync runs them (cmap's
    /// `runtime.config.totem.token` already includes the token coefficient), in milliseconds,
    /// and link 0's `knet_ping_timeout` as configured (nil: not set, so knet uses token / 2).
    public static func totemSettings(callTimeoutMillis: Int = 5000) throws
        -> (tokenMillis: UInt64, consensusMillis: UInt64, knetPingTimeoutMillis: UInt64?) {
        try BoundedCall.run("read corosync's totem timeouts", timeoutMillis: callTimeoutMillis) {
            var cmap: cmap_handle_t = 0
            let rc = cmap_initialize(&cmap)
            guard rc == CS_OK else { throw CorosyncCluster.notRunning("cmap_initialize", rc) }
            defer { cmap_finalize(cmap) }
            func read(_ key: String) throws -> UInt64 {
                var value: UInt32 = 0
                let rc = cmap_get_uint32(cmap, key, &value)
                guard rc == CS_OK else { throw CorosyncCluster.failure("cmap_get_uint32(\(key))", rc) }
                return UInt64(value)
            }
            let token = try read("runtime.config.totem.token"), consensus = try read("runtime.config.totem.consensus")
            var ping: UInt32 = 0
            let pingSet = cmap_get_uint32(cmap, "totem.interface.0.knet_ping_timeout", &ping) == CS_OK
            return (token, consensus, pingSet ? UInt64(ping) : nil)
        }
    }

    /// Node names from corosync.conf's nodelist (through cmap); ring0_addr when a node has no name.
    static func readNodeNames() -> [ClusterNodeID: String] {
        var cmap: cmap_handle_t = 0
        guard cmap_initialize(&cmap) == CS_OK else { return [:] }
        defer { cmap_finalize(cmap) }
        var out: [ClusterNodeID: String] = [:]
        for i in 0..<ClusterLimits.membersMax {
            var id: UInt32 = 0
            guard cmap_get_uint32(cmap, "nodelist.node.\(i).nodeid", &id) == CS_OK else { break }
            for key in ["name", "ring0_addr"] {
                var s: UnsafeMutablePointer<CChar>?
                if cmap_get_string(cmap, "nodelist.node.\(i).\(key)", &s) == CS_OK, let s {
                    out[id] = String(cString: s)
                    free(s)
                    break
                }
            }
        }
        return out
    }

    static func describe(_ rc: cs_error_t) -> String {
        let names: [UInt32: String] = [
            2: "CS_ERR_LIBRARY", 3: "CS_ERR_VERSION", 4: "CS_ERR_INIT", 5: "CS_ERR_TIMEOUT", 6: "CS_ERR_TRY_AGAIN",
            7: "CS_ERR_INVALID_PARAM", 8: "CS_ERR_NO_MEMORY", 9: "CS_ERR_BAD_HANDLE", 10: "CS_ERR_BUSY",
            11: "CS_ERR_ACCESS", 12: "CS_ERR_NOT_EXIST", 14: "CS_ERR_EXIST", 18: "CS_ERR_NO_RESOURCES",
            23: "CS_ERR_QUEUE_FULL", 26: "CS_ERR_TOO_BIG", 100: "CS_ERR_SECURITY",
        ]
        return names[rc.rawValue] ?? "corosync error \(rc.rawValue)"
    }

    static func notRunning(_ call: String, _ rc: cs_error_t) -> GeminusError {
        if rc == CS_ERR_LIBRARY || rc == CS_ERR_SECURITY {
            return GeminusError(.connectionFailed,
                                "corosync is not running in this network namespace (\(call): \(describe(rc)))",
                                fix: rc == CS_ERR_SECURITY
                                    ? "run the agent as root (corosync's IPC admits root and the `uidgid` entries of corosync.conf)"
                                    : "start it (`corosync -f -c /etc/corosync/corosync.conf`, see docs/HA.md) and check `corosync-quorumtool -s` answers in the same namespace")
        }
        return failure(call, rc)
    }

    static func failure(_ call: String, _ rc: cs_error_t) -> GeminusError {
        GeminusError(.connectionFailed, "\(call) failed: \(describe(rc))", fix: "check corosync's log and `corosync-cfgtool -s`")
    }
}

// Corosync calls these on the dispatch thread, inside cpg_dispatch / quorum_dispatch.

private func corosyncDeliver(_ handle: cpg_handle_t, _ group: UnsafePointer<cpg_name>?, _ nodeid: UInt32, _ pid: UInt32,
                             _ msg: UnsafeMutableRawPointer?, _ len: Int) {
    var ctx: UnsafeMutableRawPointer?
    guard cpg_context_get(handle, &ctx) == CS_OK, let ctx else { return }
    let cluster = Unmanaged<CorosyncCluster>.fromOpaque(ctx).takeUnretainedValue()
    let bytes = msg.map { Array(UnsafeRawBufferPointer(start: $0, count: len)) } ?? []
    cluster.onDeliver(from: nodeid, bytes: bytes)
}

private func corosyncConfchg(_ handle: cpg_handle_t, _ group: UnsafePointer<cpg_name>?,
                             _ members: UnsafePointer<cpg_address>?, _ memberCount: Int,
                             _ left: UnsafePointer<cpg_address>?, _ leftCount: Int,
                             _ joined: UnsafePointer<cpg_address>?, _ joinedCount: Int) {
    var ctx: UnsafeMutableRawPointer?
    guard cpg_context_get(handle, &ctx) == CS_OK, let ctx else { return }
    let cluster = Unmanaged<CorosyncCluster>.fromOpaque(ctx).takeUnretainedValue()
    func list(_ p: UnsafePointer<cpg_address>?, _ n: Int) -> [cpg_address] {
        guard let p else { return [] }
        return Array(UnsafeBufferPointer(start: p, count: min(n, ClusterLimits.membersMax)))
    }
    cluster.onConfchg(members: list(members, memberCount), left: list(left, leftCount), joined: list(joined, joinedCount))
}

private func corosyncQuorum(_ handle: quorum_handle_t, _ quorate: UInt32, _ ringSeq: UInt64, _ count: UInt32, _ view: UnsafeMutablePointer<UInt32>?) {
    var ctx: UnsafeRawPointer?
    guard quorum_context_get(handle, &ctx) == CS_OK, let ctx else { return }
    let cluster = Unmanaged<CorosyncCluster>.fromOpaque(UnsafeMutableRawPointer(mutating: ctx)).takeUnretainedValue()
    let ids = view.map { Array(UnsafeBufferPointer(start: $0, count: min(Int(count), ClusterLimits.membersMax))) } ?? []
    cluster.onQuorum(quorate: quorate != 0, view: ids)
}

/// Runs a call that may block (Corosync IPC, a process) on its own thread, bounded in time.
public enum BoundedCall {
    private final class Box<T>: @unchecked Sendable {
        let lock = NSLock()
        var result: Result<T, any Error>?
        let done = DispatchSemaphore(value: 0)
    }

    /// On timeout throws `.timeout` naming `what`; the worker is left to finish on its own
    /// (its result is discarded).
    public static func run<T>(_ what: String, timeoutMillis: Int, _ body: @escaping @Sendable () throws -> T) throws -> T {
        let box = Box<T>()
        let thread = Thread {
            let r = Result { try body() }
            box.lock.withLock { box.result = r }
            box.done.signal()
        }
        thread.name = "bounded-call"
        thread.start()
        if box.done.wait(timeout: .now() + .milliseconds(timeoutMillis)) == .timedOut {
            if let r = box.lock.withLock({ box.result }) { return try r.get() }
            throw GeminusError(.timeout, "\(what) did not return within \(timeoutMillis) ms",
                               fix: "corosync may be stuck: check `corosync-quorumtool -s` and its log")
        }
        return try box.lock.withLock { box.result! }.get()
    }
}
