#if canImport(Glibc)
import Glibc
#endif

/// The replica disk's redo journal: one epoch's disk writes, made durable before any of them
/// touches the image, so a crash (SIGKILL, power loss) part-way through applying an epoch
/// leaves either the previous epoch's image (journal not yet durable: discarded) or a journal
/// that replays the epoch whole (replay is idempotent: the same writes in the same order).
///
/// It knows nothing of `Replica`: it writes, checks and replays a file, onto any `ReplicaDisk`.
/// It never holds more than one epoch: each write replaces the file.
///
/// The file is one of:
/// - empty or missing: clean, the image is the last epoch applied;
/// - an epoch journal (`Kind.epoch`): replay it, sync the image, then clear it;
/// - an "image not resumable" marker (`Kind.unsafe`): the image is being written without a
///   journal (a live first copy), so it is no checkpoint until a journaled epoch commits;
/// - anything else (torn, bad checksum): discarded. Because a journal is written to a temporary
///   file, synced and renamed into place, a crash cannot tear it; this covers damage.
///
/// Layout (little-endian), a 64-byte header then the records:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic "GMNSDJNL" |
/// | 8 | 4 | version (1) |
/// | 12 | 4 | kind: 1 epoch, 2 unsafe marker |
/// | 16 | 8 | epoch |
/// | 24 | 8 | the disk's size in bytes (a journal of another disk is refused) |
/// | 32 | 4 | flags: bit 0, the epoch replaces the whole disk (zero it first) |
/// | 36 | 4 | record count |
/// | 40 | 8 | records length in bytes |
/// | 48 | 8 | XXH3-64 of the records |
/// | 56 | 8 | XXH3-64 of bytes 0..<56 |
///
/// Records are disk write records as on the wire (docs/PROTOCOL.md): offset u64, length u32,
/// flags u32 (bit 0: zeroes, no data follows), then the data.
public struct DiskJournal: Sendable {
    public static let magic: UInt64 = 0x4C4E_4A44_534E_4D47  // "GMNSDJNL" little-endian
    public static let version: UInt32 = 1
    public static let headerSize = 64

    public enum Kind: UInt32, Sendable {
        case epoch = 1
        case unsafe = 2
    }

    public struct Header: Equatable, Sendable {
        public var kind: Kind
        public var epoch: Epoch
        public var diskSize: UInt64
        /// A full epoch: the replay zeroes the whole disk before its records.
        public var replacesDisk: Bool
        public var recordCount: UInt32
        public var recordsLength: UInt64
        public var recordsHash: UInt64
    }

    public enum State: Equatable, Sendable {
        case clean
        /// A complete, checksum-valid epoch: replay it.
        case pending(Header)
        /// The image is mid-copy (written without a journal): not a checkpoint.
        case unsafe
        /// Torn or damaged: that epoch never committed (nothing was applied before a journal
        /// was durable), so the image is still the previous epoch's.
        case invalid(String)
    }

    public let path: String

    public init(path: String) { self.path = path }

    // MARK: - Writing

    /// Makes `writes` the durable journal of `epoch`: written beside the journal, fdatasynced,
    /// renamed over it and the directory fsynced. Only after this returns may the image change.
    public func write(epoch: Epoch, diskSize: UInt64, replacesDisk: Bool, writes: [DiskWrite]) throws(GeminusError) {
        var count: UInt32 = 0
        var length: UInt64 = 0
        for w in writes {
            let n = Self.recordCount(of: w)
            guard UInt64(count) + n <= UInt64(UInt32.max) else {
                throw GeminusError(.invalidArgument, "epoch \(epoch) has more disk write records than a journal holds")
            }
            count += UInt32(n)
            length += n * UInt64(DiskWrite.headerSize) + (w.isZeroes ? 0 : UInt64(w.data.count))
        }
        try replace(kind: .epoch, epoch: epoch, diskSize: diskSize, replacesDisk: replacesDisk, count: count, length: length, writes: writes)
    }

    /// Says durably "the image is being written without a journal; it is no checkpoint".
    public func markUnsafe(diskSize: UInt64) throws(GeminusError) {
        try replace(kind: .unsafe, epoch: .none, diskSize: diskSize, replacesDisk: false, count: 0, length: 0, writes: [])
    }

    /// Marks the journal applied: truncated to nothing, and that made durable.
    public func clear() throws(GeminusError) {
        let fd = open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 && errno == ENOENT { return }
        guard fd >= 0 else { throw ioError("cannot open the disk journal \(path) to clear it") }
        defer { close(fd) }
        guard ftruncate(fd, 0) == 0 else { throw ioError("cannot clear the disk journal \(path)") }
        guard fdatasync(fd) == 0 else { throw ioError("cannot sync the cleared disk journal \(path)") }
    }

    private func replace(kind: Kind, epoch: Epoch, diskSize: UInt64, replacesDisk: Bool, count: UInt32, length: UInt64,
                         writes: [DiskWrite]) throws(GeminusError) {
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ioError("cannot create the disk journal \(temporary)") }
        var closed = false
        defer { if !closed { close(fd) } }
        // Records first, after the header's room, hashed as they go; then the header.
        var hash = ContentDigest()
        var offset = UInt64(Self.headerSize)
        var chunk = ByteWriter(capacity: 1 << 20)
        func flush() throws(GeminusError) {
            guard !chunk.bytes.isEmpty else { return }
            chunk.bytes.withUnsafeBytes { hash.add($0) }
            try pwriteAll(fd, chunk.bytes, at: offset, what: "the disk journal \(temporary)")
            offset += UInt64(chunk.bytes.count)
            chunk = ByteWriter(capacity: 1 << 20)
        }
        for w in writes {
            for record in Self.records(of: w) {
                chunk.u64(record.offset)
                chunk.u32(record.length)
                chunk.u32(w.isZeroes ? DiskWrite.zeroesFlag : 0)
                if !w.isZeroes { chunk.append(w.data[record.dataRange]) }
                if chunk.bytes.count >= 1 << 20 { try flush() }
            }
        }
        try flush()
        precondition(offset == UInt64(Self.headerSize) + length, "journal length computed wrongly")
        let header = Header(kind: kind, epoch: epoch, diskSize: diskSize, replacesDisk: replacesDisk, recordCount: count,
                            recordsLength: length, recordsHash: hash.value)
        try pwriteAll(fd, Self.encode(header), at: 0, what: "the disk journal \(temporary)")
        guard fdatasync(fd) == 0 else { throw ioError("cannot sync the disk journal \(temporary)") }
        closed = true
        close(fd)
        guard rename(temporary, path) == 0 else { throw ioError("cannot move the disk journal \(temporary) to \(path)") }
        try syncDirectory(of: path)
    }

    // MARK: - Reading

    /// What the journal file holds, with every record checked (checksum, bounds) but nothing applied.
    public func inspect(diskSize: UInt64) throws(GeminusError) -> State {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 && errno == ENOENT { return .clean }
        guard fd >= 0 else { throw ioError("cannot open the disk journal \(path)") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw ioError("cannot stat the disk journal \(path)") }
        let fileSize = UInt64(st.st_size)
        if fileSize == 0 { return .clean }
        guard fileSize >= UInt64(Self.headerSize) else { return .invalid("torn header: \(fileSize) of \(Self.headerSize) bytes") }
        let raw = try preadAll(fd, count: Self.headerSize, at: 0, what: "the disk journal \(path)")
        let header: Header
        switch Self.decode(raw) {
        case .failure(let why): return .invalid(why.description)
        case .success(let h): header = h
        }
        guard header.diskSize == diskSize else {
            throw GeminusError(.invalidArgument, "the disk journal \(path) belongs to a \(header.diskSize)-byte disk, this replica disk has \(diskSize) bytes",
                               fix: "the image was replaced: if it should start afresh, delete \(path)")
        }
        guard fileSize == UInt64(Self.headerSize) + header.recordsLength else {
            return .invalid("torn: \(fileSize - UInt64(Self.headerSize)) of \(header.recordsLength) record bytes")
        }
        if header.kind == .unsafe { return header.recordCount == 0 ? .unsafe : .invalid("an unsafe marker with records") }
        var problem: String?
        try forEachRecord(fd, header) { (w: DiskWrite) throws(GeminusError) in
            if problem == nil && (w.end > diskSize || w.end < w.offset) {
                problem = "a record at \(w.offset)+\(w.length) beyond the \(diskSize)-byte disk"
            }
        } corrupt: { problem = problem ?? $0 }
        if let problem { return .invalid(problem) }
        return .pending(header)
    }

    /// Applies a pending journal onto `disk`: zeroes it first for a full epoch, then every
    /// record in order. Idempotent, so a crash during replay is mended by replaying again.
    /// The caller syncs the disk and clears the journal.
    public func replay(_ header: Header, onto disk: any ReplicaDisk) throws(GeminusError) {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw ioError("cannot open the disk journal \(path)") }
        defer { close(fd) }
        if header.replacesDisk { try disk.zeroAll() }
        var damaged: String?
        try forEachRecord(fd, header) { (w: DiskWrite) throws(GeminusError) in
            if w.isZeroes { try disk.zero(offset: w.offset, length: w.length) } else { try disk.write(offset: w.offset, w.data) }
        } corrupt: { damaged = $0 }
        // `inspect` checked every byte: a change since is the file being damaged under us.
        if let damaged { throw GeminusError(.io, "the disk journal \(path) changed while it was replayed: \(damaged)", fix: "check the disk it lives on") }
    }

    /// Reads the records one at a time (memory stays at one record), hashing them; `corrupt`
    /// hears of a malformed record or a hash mismatch (after the records read till then).
    private func forEachRecord(_ fd: Int32, _ header: Header, _ body: (DiskWrite) throws(GeminusError) -> Void,
                               corrupt: (String) -> Void) throws(GeminusError) {
        var hash = ContentDigest()
        var offset = UInt64(Self.headerSize)
        let end = offset + header.recordsLength
        for i in 0..<header.recordCount {
            guard end - offset >= UInt64(DiskWrite.headerSize) else { return corrupt("record \(i) cut short") }
            let head = try preadAll(fd, count: DiskWrite.headerSize, at: offset, what: "the disk journal \(path)")
            head.withUnsafeBytes { hash.add($0) }
            offset += UInt64(DiskWrite.headerSize)
            var r = ByteReader(head)
            guard let at = r.u64(), let length = r.u32(), let flags = r.u32() else { return corrupt("record \(i) cut short") }
            guard flags & ~DiskWrite.knownFlags == 0 else { return corrupt("record \(i) has unknown flags \(flags)") }
            if flags & DiskWrite.zeroesFlag != 0 {
                try body(.zeroes(offset: at, length: UInt64(length)))
            } else {
                guard end - offset >= UInt64(length) else { return corrupt("record \(i)'s data cut short") }
                let data = try preadAll(fd, count: Int(length), at: offset, what: "the disk journal \(path)")
                data.withUnsafeBytes { hash.add($0) }
                offset += UInt64(length)
                try body(DiskWrite(offset: at, data: data))
            }
        }
        guard offset == end else { return corrupt("\(end - offset) bytes after the last record") }
        guard hash.value == header.recordsHash else { return corrupt("records checksum mismatch") }
    }

    // MARK: - Format

    static func encode(_ h: Header) -> [UInt8] {
        var w = ByteWriter(capacity: headerSize)
        w.u64(magic)
        w.u32(version)
        w.u32(h.kind.rawValue)
        w.u64(h.epoch.rawValue)
        w.u64(h.diskSize)
        w.u32(h.replacesDisk ? 1 : 0)
        w.u32(h.recordCount)
        w.u64(h.recordsLength)
        w.u64(h.recordsHash)
        let headerHash = w.bytes.withUnsafeBytes { XXH3.hash($0) }
        w.u64(headerHash)
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) -> Result<Header, DecodeProblem> {
        var r = ByteReader(bytes)
        guard bytes.count == headerSize, let m = r.u64(), let v = r.u32(), let k = r.u32(), let e = r.u64(), let size = r.u64(),
              let flags = r.u32(), let count = r.u32(), let length = r.u64(), let hash = r.u64(), let headerHash = r.u64()
        else { return .failure(DecodeProblem("short header")) }
        guard m == magic else { return .failure(DecodeProblem("not a disk journal (bad magic)")) }
        guard headerHash == bytes.withUnsafeBytes({ XXH3.hash(UnsafeRawBufferPointer(rebasing: $0[0..<56])) }) else {
            return .failure(DecodeProblem("header checksum mismatch"))
        }
        guard v == version else { return .failure(DecodeProblem("journal version \(v), this build reads \(version)")) }
        guard let kind = Kind(rawValue: k), flags & ~1 == 0 else { return .failure(DecodeProblem("unknown kind \(k) or flags \(flags)")) }
        return .success(Header(kind: kind, epoch: Epoch(e), diskSize: size, replacesDisk: flags & 1 != 0, recordCount: count,
                               recordsLength: length, recordsHash: hash))
    }

    struct DecodeProblem: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    /// One record of a write: a zero write longer than a u32 becomes several.
    private struct RecordPiece {
        var offset: UInt64
        var length: UInt32
        var dataRange: Range<Int>
    }

    private static func recordCount(of w: DiskWrite) -> UInt64 {
        w.length == 0 ? 1 : (w.length + UInt64(UInt32.max) - 1) / UInt64(UInt32.max)
    }

    private static func records(of w: DiskWrite) -> [RecordPiece] {
        var pieces: [RecordPiece] = []
        var done: UInt64 = 0
        repeat {
            let n = min(w.length - done, UInt64(UInt32.max))
            let range = w.isZeroes ? 0..<0 : Int(done)..<Int(done + n)
            pieces.append(RecordPiece(offset: w.offset + done, length: UInt32(n), dataRange: range))
            done += n
        } while done < w.length
        return pieces
    }

    private func ioError(_ what: String) -> GeminusError {
        GeminusError(.io, "\(what): \(String(cString: strerror(errno)))", fix: "check the filesystem holding \(path) (space, permissions, errors in the kernel log)")
    }
}

/// One-shot XXH3-64 (the journal's header checksum).
enum XXH3 {
    static func hash(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var d = ContentDigest()
        d.add(bytes)
        return d.value
    }
}

// MARK: - Positioned I/O with the whole buffer or an error

public func pwriteAll(_ fd: Int32, _ bytes: [UInt8], at offset: UInt64, what: String) throws(GeminusError) {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { raw -> Int in
            guard let base = raw.baseAddress else { return 0 }
            return pwrite(fd, base + done, raw.count - done, off_t(offset) + off_t(done))
        }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw GeminusError(.io, "writing \(what) failed: \(String(cString: strerror(errno)))", fix: "check the disk and filesystem (space, errors in the kernel log)") }
        done += n
    }
}

func preadAll(_ fd: Int32, count: Int, at offset: UInt64, what: String) throws(GeminusError) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var done = 0
    while done < count {
        let n = bytes.withUnsafeMutableBytes { raw -> Int in
            guard let base = raw.baseAddress else { return 0 }
            return pread(fd, base + done, raw.count - done, off_t(offset) + off_t(done))
        }
        if n < 0 && errno == EINTR { continue }
        guard n >= 0 else { throw GeminusError(.io, "reading \(what) failed: \(String(cString: strerror(errno)))", fix: "check the disk and filesystem (errors in the kernel log)") }
        guard n > 0 else { throw GeminusError(.io, "\(what) ended at \(offset + UInt64(done)) bytes, \(count - done) bytes early") }
        done += n
    }
    return bytes
}

/// fsync of the directory holding `path`: makes a rename or a new file in it durable.
func syncDirectory(of path: String) throws(GeminusError) {
    let dir: String
    if let slash = path.lastIndex(of: "/") { dir = slash == path.startIndex ? "/" : String(path[..<slash]) } else { dir = "." }
    let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { throw GeminusError(.io, "cannot open directory \(dir) to sync it: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    guard fsync(fd) == 0 else { throw GeminusError(.io, "cannot sync directory \(dir): \(String(cString: strerror(errno)))", fix: "check the filesystem holding \(dir)") }
}
