import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// A minimal NBD client over a unix socket: the fixed newstyle handshake with `NBD_OPT_GO`,
/// then WRITE, WRITE_ZEROES, FLUSH and DISC with simple replies, one request at a time. It is
/// how the secondary writes a qcow2 replica through qemu-storage-daemon (QEMU's own qcow2
/// driver places the guest's bytes in the image); `NBDExport` is the server side of the same
/// protocol.
///
/// Not thread-safe: one owner (the replica disk) issues its requests in order.
public final class NBDClient {
    public let socketPath: String
    /// The export's size, from the handshake.
    public let sizeBytes: UInt64
    /// Transmission flags the server sent (SEND_FLUSH, SEND_WRITE_ZEROES...).
    public let transmissionFlags: UInt16
    private var conn: NBDConn
    private var nextHandle: UInt64 = 1
    private var closed = false

    static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943      // "NBDMAGIC"
    static let optMagic: UInt64 = 0x4948_4156_454f_5054      // "IHAVEOPT"
    static let replyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let flagSendFlush: UInt16 = 0x0004
    static let flagSendWriteZeroes: UInt16 = 0x0040
    /// Larger writes are split: QEMU's NBD server takes at most 32 MiB per request.
    static let maxRequestBytes = 4 << 20
    /// WRITE_ZEROES lengths are u32; a whole-disk zero goes in pieces of this, 1 MiB aligned.
    static let maxZeroBytes: UInt64 = 1 << 30

    /// Connects (retrying until `timeout`: the server may still be starting) and negotiates
    /// `exportName` with `peer` (the daemon the agent started). Every later request waits at
    /// most `ioTimeout` seconds for its reply.
    public init(socketPath: String, exportName: String, timeout: Double = 10, ioTimeout: Int = 120,
                peer: SocketPeer = .sameUser) throws(GeminusError) {
        self.socketPath = socketPath
        let fd = try UnixSocket.connect(path: socketPath, timeout: timeout, what: "the NBD server", peer: peer)
        var tv = timeval(tv_sec: ioTimeout, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var c = NBDConn(fd: fd)
        let negotiated: (UInt64, UInt16)
        do throws(GeminusError) {
            negotiated = try Self.handshake(&c, exportName: exportName, socketPath: socketPath)
        } catch {
            close(fd)
            throw error
        }
        conn = c
        sizeBytes = negotiated.0
        transmissionFlags = negotiated.1
    }

    deinit { if !closed { close(conn.fd) } }

    private static func handshake(_ c: inout NBDConn, exportName: String, socketPath: String) throws(GeminusError) -> (UInt64, UInt16) {
        func broken(_ what: String) -> GeminusError {
            GeminusError(.connectionFailed, "the NBD handshake with \(socketPath) failed: \(what)", fix: "check that the server is an NBD server (qemu-storage-daemon --export type=nbd)")
        }
        guard let m1 = c.get64(), m1 == nbdMagic, let m2 = c.get64(), m2 == optMagic, let serverFlags = c.get16() else {
            throw broken("no fixed newstyle greeting")
        }
        guard serverFlags & 0x1 != 0 else { throw broken("the server does not speak fixed newstyle") }
        let noZeroes = serverFlags & 0x2 != 0
        guard c.put32(noZeroes ? 0x3 : 0x1) else { throw broken("the server closed the connection") }
        // NBD_OPT_GO: name length, name, no information requests.
        let name = Array(exportName.utf8)
        var data: [UInt8] = []
        NBDConn.append32(&data, UInt32(name.count))
        data += name
        NBDConn.append16(&data, 0)
        guard c.put64(optMagic), c.put32(7), c.put32(UInt32(data.count)), c.put(data) else { throw broken("the server closed the connection") }
        var size: UInt64?
        var flags: UInt16 = 0
        while true {
            guard let magic = c.get64(), magic == replyMagic, let option = c.get32(), option == 7, let type = c.get32(),
                  let length = c.get32(), length <= 1 << 16, let payload = c.get(Int(length)) else { throw broken("a malformed option reply") }
            switch type {
            case 1:  // ACK: transmission starts
                guard let size else { throw broken("the server sent no export size") }
                return (size, flags)
            case 3:  // INFO
                var r = BigEndianReader(payload)
                if r.u16() == 0, let s = r.u64(), let f = r.u16() { (size, flags) = (s, f) }
            default:
                if type & 0x8000_0000 != 0 {
                    let message = String(decoding: payload, as: UTF8.self)
                    throw broken("export '\(exportName)' refused (error \(type & 0x7fff_ffff)\(message.isEmpty ? "" : ": " + message))")
                }
            }
        }
    }

    // MARK: - Transmission

    /// Writes the whole buffer at `offset`.
    public func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
        var done = 0
        repeat {
            let n = min(data.count - done, Self.maxRequestBytes)
            let piece = done == 0 && n == data.count ? data : Array(data[done..<(done + n)])
            try request(type: 1, offset: offset + UInt64(done), length: UInt32(n), payload: piece, what: "writing \(n) bytes at \(offset + UInt64(done))")
            done += n
        } while done < data.count
    }

    /// Makes `length` bytes from `offset` read as zeros (WRITE_ZEROES, which lets a qcow2 image
    /// mark clusters zero instead of writing them; written zeros when the server lacks it).
    public func writeZeroes(offset: UInt64, length: UInt64) throws(GeminusError) {
        var done: UInt64 = 0
        while done < length {
            let n = min(length - done, Self.maxZeroBytes)
            if transmissionFlags & Self.flagSendWriteZeroes != 0 {
                try request(type: 6, offset: offset + done, length: UInt32(n), payload: [], what: "zeroing \(n) bytes at \(offset + done)")
            } else {
                var at: UInt64 = 0
                while at < n {
                    let m = min(n - at, UInt64(Self.maxRequestBytes))
                    try write(offset: offset + done + at, [UInt8](repeating: 0, count: Int(m)))
                    at += m
                }
            }
            done += n
        }
    }

    /// Everything written so far is on the server's stable storage when this returns.
    public func flush() throws(GeminusError) {
        guard transmissionFlags & Self.flagSendFlush != 0 else {
            throw GeminusError(.io, "the NBD server at \(socketPath) offers no FLUSH: what it was sent cannot be made durable",
                               fix: "serve the image with qemu-storage-daemon (its NBD exports offer FLUSH)")
        }
        try request(type: 3, offset: 0, length: 0, payload: [], what: "flushing")
    }

    /// NBD_CMD_DISC, then the socket is closed (the server finishes the requests it replied to).
    public func disconnect() {
        guard !closed else { return }
        var head: [UInt8] = []
        Self.appendRequest(&head, type: 2, handle: 0, offset: 0, length: 0)
        _ = conn.put(head)
        closed = true
        close(conn.fd)
    }

    private static func appendRequest(_ b: inout [UInt8], type: UInt16, handle: UInt64, offset: UInt64, length: UInt32) {
        NBDConn.append32(&b, requestMagic)
        NBDConn.append16(&b, 0)
        NBDConn.append16(&b, type)
        NBDConn.append64(&b, handle)
        NBDConn.append64(&b, offset)
        NBDConn.append32(&b, length)
    }

    private func request(type: UInt16, offset: UInt64, length: UInt32, payload: [UInt8], what: String) throws(GeminusError) {
        guard !closed else {
            throw GeminusError(.internalInvariant, "\(what) on the NBD server at \(socketPath) after the connection was closed")
        }
        let handle = nextHandle
        nextHandle &+= 1
        var head: [UInt8] = []
        head.reserveCapacity(28)
        Self.appendRequest(&head, type: type, handle: handle, offset: offset, length: length)
        guard conn.put(head), payload.isEmpty || conn.put(payload) else { throw lostConnection(what) }
        guard let magic = conn.get32(), let error = conn.get32(), let replyHandle = conn.get64() else { throw lostConnection(what) }
        guard magic == Self.simpleReplyMagic, replyHandle == handle else {
            throw lostConnection("\(what): an unexpected reply (magic \(String(magic, radix: 16)), handle \(replyHandle) for \(handle))")
        }
        guard error == 0 else {
            throw GeminusError(.io, "\(what) on the NBD server at \(socketPath) failed: \(String(cString: strerror(Int32(error))))",
                               fix: "check the image's filesystem (space, errors in the kernel log) and the server's log")
        }
    }

    private func lostConnection(_ what: String) -> GeminusError {
        let why = errno == EAGAIN || errno == EWOULDBLOCK ? "no reply in time" : "the connection closed"
        return GeminusError(.io, "\(what) on the NBD server at \(socketPath) failed: \(why)", fix: "check that the server still runs (its log)")
    }
}

/// Big-endian reads from a byte array (NBD's option payloads).
struct BigEndianReader {
    private let bytes: [UInt8]
    private var at = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    mutating func take(_ n: Int) -> ArraySlice<UInt8>? {
        guard bytes.count - at >= n else { return nil }
        defer { at += n }
        return bytes[at..<(at + n)]
    }

    mutating func u16() -> UInt16? { take(2).map { $0.reduce(0) { $0 << 8 | UInt16($1) } } }
    mutating func u64() -> UInt64? { take(8).map { $0.reduce(0) { $0 << 8 | UInt64($1) } } }
}
