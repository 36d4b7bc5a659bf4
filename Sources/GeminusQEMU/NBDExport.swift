import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// The primary agent's end of a CA guest's disk mirror: a minimal NBD server (fixed newstyle
/// handshake, `NBD_OPT_GO`/`EXPORT_NAME`, simple replies; READ, WRITE, FLUSH, DISC) on a unix
/// socket, the target of QEMU's `blockdev-mirror` in `write-blocking` mode. QEMU completes a
/// guest write only once both its own disk and this server have it, and drains in-flight I/O
/// when the guest is paused, so every write the guest made before a checkpoint's pause is
/// recorded here before the pause returns; `take()` then hands them to that checkpoint.
///
/// Bounded: while `collecting` says a secondary is to receive them, writes wait here up to
/// `maxPendingBytes`; past that the next write's reply waits for a checkpoint to take them (the
/// guest's disk I/O slows, nothing is dropped). While no secondary is protected they are not
/// kept: protection starts again with a full checkpoint, which carries the whole disk.
public final class NBDExport: @unchecked Sendable {
    public static let maxPendingBytes = 64 << 20
    /// Zero records carry no bytes: their count is bounded too (the secondary refuses an epoch
    /// of more than 2^20 records).
    public static let maxPendingRecords = 65_536
    /// The largest READ or WRITE served. The NBD protocol's default maximum payload when the
    /// server advertises no block sizes (this one does not) is 32 MiB, and QEMU's client never
    /// sends more; a longer request is refused before a byte of it is allocated.
    public static let maxRequestBytes: UInt32 = 32 << 20
    public let socketPath: String
    public let exportName = "geminus"
    public let sizeBytes: UInt64
    /// The primary's own disk file when it is raw: READ requests are served from it (the mirror
    /// does not read its target; the NBD client may). nil for an image whose file is not the
    /// guest's bytes (qcow2): READ then fails with EIO rather than answer wrong bytes.
    private let diskPath: String?
    private let listener: Int32
    private let lock = NSCondition()
    private var pending: [DiskWrite] = []
    private var pendingBytes = 0
    private var collecting: @Sendable () -> Bool = { false }
    /// Keep every write whatever `collecting` says: the disk's first copy is streaming (the
    /// mirror's bulk copy and the guest's writes alike must reach the secondary).
    private var keepingAll = false
    private var closed = false
    private var client: Int32 = -1
    private var _connected = false
    private var _lost: String?
    private var _writesReceived = 0
    public var writesReceived: Int { lock.withLock { _writesReceived } }

    /// `clientUser`: the user QEMU runs as when it is not root (libvirt's), given the socket so
    /// it can connect; the socket is otherwise root's alone (0600).
    public init(socketPath: String, diskPath: String?, sizeBytes: UInt64, clientUser: String? = nil) throws(GeminusError) {
        self.socketPath = socketPath
        self.diskPath = diskPath
        self.sizeBytes = sizeBytes
        listener = try UnixSocket.listen(path: socketPath, what: "the disk export socket")
        if let clientUser, let pw = getpwnam(clientUser), chown(socketPath, pw.pointee.pw_uid, pw.pointee.pw_gid) != 0 {
            let e = errno
            close(listener)
            throw GeminusError(.io, "cannot give the disk export socket \(socketPath) to \(clientUser): \(String(cString: strerror(e)))", fix: "run the agent as root")
        }
        let t = Thread { [weak self] in self?.serve() }
        t.name = "geminus-nbd-export"
        t.start()
    }

    deinit { close(listener) }

    /// Whether writes are kept for the next checkpoint (a secondary is being protected).
    public func collect(while condition: @escaping @Sendable () -> Bool) {
        lock.withLock { collecting = condition }
    }

    /// Every write is kept (`on`), or only while `collect`'s condition holds (`off`, which also
    /// drops what waits when that condition is false: the copy it belonged to was abandoned).
    public func keepAll(_ on: Bool) {
        lock.withLock {
            keepingAll = on
            if !on && !collecting() {
                pending = []
                pendingBytes = 0
            }
            lock.broadcast()
        }
    }

    /// QEMU's mirror is connected and has not gone away.
    public var isConnected: Bool { lock.withLock { _connected } }
    /// Why the mirror's connection ended, if it did: writes after that were not seen here.
    public var lost: String? { lock.withLock { _lost } }

    /// The writes recorded since the last call, in the order QEMU made them.
    public func take() -> [DiskWrite] {
        lock.lock()
        defer { lock.unlock() }
        let w = pending
        pending = []
        pendingBytes = 0
        lock.broadcast()
        return w
    }

    public func stop() {
        lock.withLock {
            closed = true
            lock.broadcast()
        }
        shutdown(listener, Int32(SHUT_RDWR))
        lock.withLock { if client >= 0 { shutdown(client, Int32(SHUT_RDWR)) } }
        unlink(socketPath)
    }

    // MARK: - The protocol

    private static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943      // "NBDMAGIC"
    private static let optMagic: UInt64 = 0x4948_4156_454f_5054      // "IHAVEOPT"
    private static let replyMagic: UInt64 = 0x0003_e889_0455_65a9
    private static let requestMagic: UInt32 = 0x2560_9513
    private static let simpleReplyMagic: UInt32 = 0x6744_6698
    /// Transmission flags: HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES. Zero writes (the bulk
    /// copy of a mostly empty disk, or a guest's write-zeroes) travel as zero records, not as
    /// zero bytes. TRIM is not offered: QEMU's NBD client then drops discards instead of
    /// sending them, and enrolment refuses `discard='unmap'` on a replicated disk, so neither
    /// side discards and both keep the same bytes.
    private static let transmissionFlags: UInt16 = 0x0001 | 0x0004 | 0x0040
    /// NBD_EINVAL: a request outside the export, too long, or of a kind not offered.
    private static let errorInvalid: UInt32 = 22

    private func serve() {
        while let fd = UnixSocket.accept(listener, keepWaiting: { !lock.withLock { closed } }) {
            lock.withLock { client = fd }
            let reason = session(fd)
            lock.withLock {
                if _connected { _lost = reason }
                _connected = false
                client = -1
            }
            close(fd)
        }
    }

    /// One client, handshake then transmission; returns why it ended.
    private func session(_ fd: Int32) -> String {
        var c = NBDConn(fd: fd)
        guard c.put64(Self.nbdMagic), c.put64(Self.optMagic), c.put16(0x0001 | 0x0002),  // FIXED_NEWSTYLE | NO_ZEROES
              let clientFlags = c.get32() else { return "the handshake broke off" }
        let noZeroes = clientFlags & 0x2 != 0
        // Option haggling.
        while true {
            guard let magic = c.get64(), magic == Self.optMagic, let option = c.get32(), let length = c.get32(),
                  length <= 4096, c.get(Int(length)) != nil else { return "bad option from the client" }
            switch option {
            case 1:  // EXPORT_NAME: no reply header; size, flags, then transmission
                guard c.put64(sizeBytes), c.put16(Self.transmissionFlags), noZeroes || c.put([UInt8](repeating: 0, count: 124)) else { return "client gone" }
                return transmission(&c)
            case 6, 7:  // INFO, GO
                var info: [UInt8] = []
                NBDConn.append16(&info, 0)  // NBD_INFO_EXPORT
                NBDConn.append64(&info, sizeBytes)
                NBDConn.append16(&info, Self.transmissionFlags)
                guard optionReply(&c, option, 3, info), optionReply(&c, option, 1, []) else { return "client gone" }
                if option == 7 { return transmission(&c) }
            case 2:  // ABORT
                _ = optionReply(&c, option, 1, [])
                return "the client aborted the handshake"
            default:  // STRUCTURED_REPLY, meta contexts, TLS, LIST...: not offered
                guard optionReply(&c, option, 0x8000_0001, []) else { return "client gone" }
            }
        }
    }

    private func optionReply(_ c: inout NBDConn, _ option: UInt32, _ type: UInt32, _ data: [UInt8]) -> Bool {
        c.put64(Self.replyMagic) && c.put32(option) && c.put32(type) && c.put32(UInt32(data.count)) && c.put(data)
    }

    private func transmission(_ c: inout NBDConn) -> String {
        lock.withLock {
            _connected = true
            _lost = nil
        }
        let disk = diskPath.map { open($0, O_RDONLY | O_CLOEXEC) } ?? -1
        defer { if disk >= 0 { close(disk) } }
        while true {
            guard let magic = c.get32(), magic == Self.requestMagic, let _ = c.get16(), let type = c.get16(),
                  let handle = c.get64(), let offset = c.get64(), let length = c.get32() else { return "the mirror's connection closed" }
            let inRange = offset <= sizeBytes && UInt64(length) <= sizeBytes - offset
            // Range and size are judged before anything is allocated: the length is the
            // client's word, up to 4 GiB.
            let servable = inRange && length <= Self.maxRequestBytes
            switch type {
            case 0:  // READ
                guard servable else {
                    guard reply(&c, Self.errorInvalid, handle) else { return "client gone" }
                    continue
                }
                var data = [UInt8](repeating: 0, count: Int(length))
                let ok = disk >= 0 && data.withUnsafeMutableBytes { pread(disk, $0.baseAddress, $0.count, off_t(offset)) } == Int(length)
                guard reply(&c, ok ? 0 : 5, handle), !ok || c.put(data) else { return "client gone" }
            case 1:  // WRITE
                guard servable else {
                    // The payload follows the request whatever the answer: read past it in
                    // small pieces so the next request is parsed from the right byte.
                    guard c.discard(Int(length)) else { return "the mirror's connection closed mid-write" }
                    guard reply(&c, Self.errorInvalid, handle) else { return "client gone" }
                    continue
                }
                guard let data = c.get(Int(length)) else { return "the mirror's connection closed mid-write" }
                record(DiskWrite(offset: offset, data: data))
                guard reply(&c, 0, handle) else { return "client gone" }
            case 6:  // WRITE_ZEROES (flags such as NO_HOLE change nothing about what the guest reads)
                guard inRange else {
                    guard reply(&c, Self.errorInvalid, handle) else { return "client gone" }
                    continue
                }
                if length > 0 { record(DiskWrite.zeroes(offset: offset, length: UInt64(length))) }
                guard reply(&c, 0, handle) else { return "client gone" }
            case 3:  // FLUSH: nothing is buffered here beyond the pending list, which is the point
                guard reply(&c, 0, handle) else { return "client gone" }
            case 2:  // DISC
                return "the mirror disconnected"
            default:
                guard reply(&c, Self.errorInvalid, handle) else { return "client gone" }
            }
        }
    }

    private func reply(_ c: inout NBDConn, _ error: UInt32, _ handle: UInt64) -> Bool {
        c.put32(Self.simpleReplyMagic) && c.put32(error) && c.put64(handle)
    }

    private func record(_ w: DiskWrite) {
        lock.lock()
        defer { lock.unlock() }
        _writesReceived += 1
        let keeping = { self.keepingAll || self.collecting() }
        guard keeping() else {
            pending = []
            pendingBytes = 0
            return
        }
        // Over the bound: the guest's write waits (its reply is not sent) for a checkpoint.
        while (pendingBytes + w.data.count > Self.maxPendingBytes || pending.count >= Self.maxPendingRecords)
                && !pending.isEmpty && !closed && keeping() {
            _ = lock.wait(until: Date().addingTimeInterval(0.1))
        }
        pending.append(w)
        pendingBytes += w.data.count
    }
}

/// Blocking big-endian reads and writes on one socket (the export's and `NBDClient`'s).
struct NBDConn {
    let fd: Int32

    mutating func get(_ n: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: n)
        var done = 0
        while done < n {
            let r = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, n - done, 0) }
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return nil }
            done += r
        }
        return out
    }

    /// Reads and drops `n` bytes through a small buffer (a refused request's payload).
    mutating func discard(_ n: Int) -> Bool {
        var left = n
        while left > 0 {
            guard let piece = get(min(left, 64 << 10)) else { return false }
            left -= piece.count
        }
        return true
    }

    mutating func get16() -> UInt16? { get(2).map { UInt16($0[0]) << 8 | UInt16($0[1]) } }
    mutating func get32() -> UInt32? { get(4).map { $0.reduce(0) { $0 << 8 | UInt32($1) } } }
    mutating func get64() -> UInt64? { get(8).map { $0.reduce(0) { $0 << 8 | UInt64($1) } } }

    func put(_ b: [UInt8]) -> Bool {
        var done = 0
        while done < b.count {
            let w = b.withUnsafeBytes { send(fd, $0.baseAddress! + done, b.count - done, Int32(MSG_NOSIGNAL)) }
            if w < 0 && errno == EINTR { continue }
            guard w > 0 else { return false }
            done += w
        }
        return true
    }

    func put16(_ v: UInt16) -> Bool { var b: [UInt8] = []; NBDConn.append16(&b, v); return put(b) }
    func put32(_ v: UInt32) -> Bool { var b: [UInt8] = []; NBDConn.append32(&b, v); return put(b) }
    func put64(_ v: UInt64) -> Bool { var b: [UInt8] = []; NBDConn.append64(&b, v); return put(b) }

    static func append16(_ b: inout [UInt8], _ v: UInt16) { b += [UInt8(v >> 8), UInt8(truncatingIfNeeded: v)] }
    static func append32(_ b: inout [UInt8], _ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) } }
    static func append64(_ b: inout [UInt8], _ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
}
