import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// Where QEMU writes the device state at each capture (`xen-save-devices-state`).
public enum DeviceStateTarget: Sendable {
    /// A file path QEMU's user can create (a QEMU the agent launched itself, running as root).
    case file(String)
    /// A file QEMU never opens by path: handed over with QMP `add-fd` (see `DeviceStateFD`).
    case descriptorSet(DeviceStateFD)
}

/// A memory file handed to QEMU with QMP `add-fd`, so `xen-save-devices-state` writes to
/// `/dev/fdset/N` and needs no directory QEMU's user can write (a libvirt QEMU runs as
/// libvirt-qemu under a sandbox).
///
/// Verified on QEMU 7.2 / libvirt 9.0: qemu_open on `/dev/fdset/N` dups an fd of the set whose
/// access mode equals the requested one; xen-save opens O_WRONLY|O_CREAT|O_TRUNC, so the fd
/// passed is a write-only open of the file, and the agent keeps a read-write one to read it.
/// The dup shares the passed fd's file offset, so every save starts with truncate + seek to 0
/// here; the result is read with pread. The fdset outlives the QMP connection (libvirt's own
/// monitor keeps QEMU's monitor refcount up), so `register` first removes sets a previous agent
/// left behind (same `opaque` tag).
///
/// The file is an unlinked file on /dev/shm (Swift's Glibc hides memfd_create): no name is
/// left behind once both descriptors are open.
public final class DeviceStateFD: @unchecked Sendable {
    public static let opaque = "geminus-devstate"
    public let fdsetID: Int
    private let readFD: Int32
    private let writeFD: Int32

    private init(fdsetID: Int, readFD: Int32, writeFD: Int32) {
        self.fdsetID = fdsetID
        self.readFD = readFD
        self.writeFD = writeFD
    }

    deinit {
        close(readFD)
        close(writeFD)
    }

    /// `/dev/fdset/N`, the file name to give QEMU.
    public var qemuPath: String { "/dev/fdset/\(fdsetID)" }

    /// Creates the file and adds it to a new fdset of the QEMU behind `qmp`.
    public static func register(with qmp: QMPClient) throws(GeminusError) -> DeviceStateFD {
        removeStale(from: qmp)
        let path = "/dev/shm/geminus-devstate-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        let r = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard r >= 0 else {
            throw GeminusError(.io, "cannot create the device-state file \(path): \(String(cString: strerror(errno)))")
        }
        let w = open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC)
        let openErrno = errno
        unlink(path)
        guard w >= 0 else {
            close(r)
            throw GeminusError(.io, "cannot reopen the device-state file \(path) write-only: \(String(cString: strerror(openErrno)))")
        }
        do throws(GeminusError) {
            let reply = try qmp.execute("add-fd", arguments: ["opaque": opaque], passing: w) as? [String: Any]
            guard let id = (reply?["fdset-id"] as? NSNumber)?.intValue else {
                throw GeminusError(.protocolMismatch, "QMP add-fd returned no fdset-id: \(String(describing: reply))")
            }
            return DeviceStateFD(fdsetID: id, readFD: r, writeFD: w)
        } catch {
            close(r)
            close(w)
            throw error
        }
    }

    /// Removes every fdset tagged with `opaque` (best effort).
    static func removeStale(from qmp: QMPClient) {
        guard let sets = try? qmp.execute("query-fdsets") as? [[String: Any]] else { return }
        for set in sets {
            let fds = set["fds"] as? [[String: Any]] ?? []
            guard let id = (set["fdset-id"] as? NSNumber)?.intValue,
                  fds.contains(where: { $0["opaque"] as? String == opaque }) else { continue }
            _ = try? qmp.execute("remove-fd", arguments: ["fdset-id": id])
        }
    }

    /// Removes this fdset from QEMU (best effort; QEMU closes its copy).
    public func unregister(from qmp: QMPClient) {
        _ = try? qmp.execute("remove-fd", arguments: ["fdset-id": fdsetID], timeout: 1)
    }

    func rewind() {
        _ = ftruncate(readFD, 0)
        _ = lseek(writeFD, 0, SEEK_SET)
    }

    func contents() throws(GeminusError) -> [UInt8] {
        var st = stat()
        guard fstat(readFD, &st) == 0 else {
            throw GeminusError(.io, "cannot stat the device-state file: \(String(cString: strerror(errno)))")
        }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { pread(readFD, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw GeminusError(.io, "cannot read the device state QEMU saved: \(String(cString: strerror(errno)))") }
            done += n
        }
        return bytes
    }
}

/// The checkpoint cycle over QMP shared by every QEMU guest (agent-launched or libvirt's):
/// `stop` → find and copy dirty pages → `xen-save-devices-state` → `cont`, timed.
public final class QMPCheckpointer: @unchecked Sendable {
    public let qmp: QMPClient
    public let memory: PageMemory
    public let target: DeviceStateTarget
    private var finder: any DirtyPageFinder
    private let lock = NSLock()
    private var current = CaptureTimings()
    private var _lastTimings: CaptureTimings?
    private var _isPaused = false

    public init(qmp: QMPClient, memory: PageMemory, target: DeviceStateTarget, finder: any DirtyPageFinder) {
        self.qmp = qmp
        self.memory = memory
        self.target = target
        self.finder = finder
    }

    public var dirtyPageMethod: String { lock.withLock { finder.methodName } }
    /// The method's name and counters, for `geminus status`.
    public var dirtyPageReport: [String: String] {
        lock.withLock { finder.statusReport.merging(["dirtyPages": finder.methodName]) { _, new in new } }
    }

    /// Replaces the dirty-page method; the next capture must then be full (a new finder knows
    /// nothing of what was written before it came).
    public func useFinder(_ newFinder: any DirtyPageFinder) {
        lock.withLock { finder = newFinder }
    }

    /// The parts of the capture just made (valid between `capture` and the next `pause`).
    public var lastCaptureParts: CaptureParts {
        lock.withLock { CaptureParts(dirtyPagesNanos: current.findCopyNanos, deviceStateNanos: current.saveNanos) }
    }

    /// The timings of the last complete pause → capture → resume cycle.
    public var lastTimings: CaptureTimings? { lock.lock(); defer { lock.unlock() }; return _lastTimings }
    /// Whether the last of `pause`/`resume` was a successful `pause`.
    public var isPaused: Bool { lock.lock(); defer { lock.unlock() }; return _isPaused }

    public func pause() throws(GeminusError) {
        let t0 = Monotonic.nanos()
        try qmp.execute("stop")
        lock.lock()
        current = CaptureTimings()
        current.stopNanos = Monotonic.nanos() - t0
        _isPaused = true
        lock.unlock()
    }

    public func resume() throws(GeminusError) {
        let t0 = Monotonic.nanos()
        try qmp.execute("cont")
        lock.lock()
        current.contNanos = Monotonic.nanos() - t0
        _lastTimings = current
        _isPaused = false
        lock.unlock()
    }

    /// A round of the live first copy: pages only, taken while the guest runs (see
    /// `ProtectedGuest.captureLive`). The finder starts a new written set as at any capture.
    public func captureLive(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        lock.lock()
        defer { lock.unlock() }
        buffer.reset()
        buffer.isFull = full
        buffer.isLive = true
        try finder.collect(from: memory, full: full, into: buffer)
    }

    /// Whether the finder may run while the guest does: a verifying finder compares against a
    /// shadow and would report the running guest's writes as misses.
    public var findsWhileRunning: Bool { lock.withLock { !(finder is VerifyingFinder) } }

    public func capture(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        lock.lock()
        defer { lock.unlock() }
        buffer.reset()
        buffer.isFull = full
        let t0 = Monotonic.nanos()
        try finder.collect(from: memory, full: full, into: buffer)
        let t1 = Monotonic.nanos()
        switch target {
        case .file(let path):
            // The file is the agent's (0600, never a link) before QEMU opens it: QEMU truncates
            // an existing file and keeps its mode, but would create a missing one 0660.
            let fd = try PrivateFile.openOrCreate(path, what: "the device-state file").fd
            defer { close(fd) }
            try qmp.execute("xen-save-devices-state", arguments: ["filename": path, "live": false])
            buffer.deviceState = try Self.readAll(fd, path: path)
        case .descriptorSet(let file):
            file.rewind()
            try qmp.execute("xen-save-devices-state", arguments: ["filename": file.qemuPath, "live": false])
            buffer.deviceState = try file.contents()
        }
        guard !buffer.deviceState.isEmpty else {
            throw GeminusError(.hypervisor, "QEMU saved an empty device state")
        }
        let t2 = Monotonic.nanos()
        current.findCopyNanos = t1 - t0
        current.saveNanos = t2 - t1
        current.pages = buffer.pageCount
        current.deviceStateBytes = buffer.deviceState.count
    }

    /// What QEMU wrote to the device-state file, read through the agent's own descriptor.
    static func readAll(_ fd: Int32, path: String) throws(GeminusError) -> [UInt8] {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw GeminusError(.io, "cannot stat the device state QEMU saved to \(path): \(String(cString: strerror(errno)))") }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw GeminusError(.io, "cannot read the device state QEMU saved to \(path): \(n == 0 ? "short file" : String(cString: strerror(errno)))") }
            done += n
        }
        return bytes
    }
}

/// The steps of loading committed device state into a waiting `-incoming defer` QEMU whose RAM
/// already holds the replica (x-ignore-shared), shared by the agent's and libvirt's standbys.
public enum IncomingMigration {
    public static let fdName = "geminus-incoming"

    /// RAM is shared (the replica file), so the stream carries device state only.
    public static func enableIgnoreShared(_ qmp: QMPClient) throws(GeminusError) {
        try qmp.execute("migrate-set-capabilities",
                        arguments: ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
    }

    /// Passes `readEnd` with `getfd` and starts `migrate-incoming fd:`. `fd:` works under
    /// libvirt's `-sandbox spawn=deny`, where `exec:` kills QEMU. The caller closes `readEnd`.
    public static func startFromPipe(_ qmp: QMPClient, readEnd: Int32) throws(GeminusError) {
        try qmp.execute("getfd", arguments: ["fdname": fdName], passing: readEnd)
        try qmp.execute("migrate-incoming", arguments: ["uri": "fd:\(fdName)"])
    }

    /// Polls `query-migrate` until completed; returns the number of polls.
    public static func waitCompleted(_ qmp: QMPClient, timeout: Double) throws(GeminusError) -> Int {
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        var polls = 0
        while true {
            polls += 1
            let info = try qmp.execute("query-migrate") as? [String: Any]
            let status = info?["status"] as? String ?? ""
            if status == "completed" { return polls }
            if status == "failed" || status == "cancelled" {
                let why = info?["error-desc"] as? String ?? "no reason given"
                throw GeminusError(.hypervisor, "loading the device state into the standby QEMU failed (\(status)): \(why)")
            }
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.timeout, "the standby QEMU did not load the device state within \(timeout) s (status '\(status)')")
            }
            Monotonic.sleep(nanos: 200_000)
        }
    }

    /// `cont`, retried while QEMU answers "Migration is not finalized yet"; returns the retries.
    public static func contRetrying(_ qmp: QMPClient) throws(GeminusError) -> Int {
        var retries = 0
        while true {
            do throws(GeminusError) {
                try qmp.execute("cont")
                return retries
            } catch {
                guard error.code == .hypervisor, error.message.contains("not finalized"), retries < 2000 else { throw error }
                retries += 1
                Monotonic.sleep(nanos: 500_000)
            }
        }
    }

    /// A pipe already holding `bytes` with its write end closed; returns the read end. Bytes
    /// beyond the pipe's capacity are written by a short-lived thread as QEMU reads.
    public static func pipe(holding bytes: [UInt8]) throws(GeminusError) -> Int32 {
        var fds: [Int32] = [-1, -1]
        // Glibc's Swift overlay hides pipe2 and F_SETPIPE_SZ (GNU extensions): set close-on-exec
        // at once, so no QEMU started meanwhile inherits the write end (it would never see EOF).
        guard Glibc.pipe(&fds) == 0 else {
            throw GeminusError(.resourceExhausted, "cannot create a pipe: \(String(cString: strerror(errno)))")
        }
        let (r, w) = (fds[0], fds[1])
        _ = fcntl(r, F_SETFD, FD_CLOEXEC)
        _ = fcntl(w, F_SETFD, FD_CLOEXEC)
        let setPipeSize: Int32 = 1031, getPipeSize: Int32 = 1032  // F_SETPIPE_SZ, F_GETPIPE_SZ (Linux)
        _ = fcntl(w, setPipeSize, Int32(min(bytes.count + 4096, 1 << 20)))
        let capacity = Int(fcntl(w, getPipeSize))
        let first = min(bytes.count, max(0, capacity))
        var written = 0
        while written < first {
            let n = bytes.withUnsafeBytes { write(w, $0.baseAddress! + written, first - written) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                close(r); close(w)
                throw GeminusError(.io, "cannot write the device state into a pipe: \(String(cString: strerror(errno)))")
            }
            written += n
        }
        if written == bytes.count {
            close(w)
        } else {
            let rest = Array(bytes[written...])
            Thread.detachNewThread {
                var off = 0
                while off < rest.count {
                    let n = rest.withUnsafeBytes { write(w, $0.baseAddress! + off, rest.count - off) }
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 { break }
                    off += n
                }
                close(w)
            }
        }
        return r
    }
}
