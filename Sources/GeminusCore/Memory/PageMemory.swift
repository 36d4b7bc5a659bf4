#if canImport(Glibc)
import Glibc
#endif

/// A region of guest-physical memory, page-addressed: the simulated VM's RAM, the secondary's
/// replica, or (later) QEMU's shared RAM file mapped by the agent. It is mmap'ed, not a Swift
/// array, because it is large, must not be copied, and is shared with other processes.
public final class PageMemory: @unchecked Sendable {
    public let pageCount: Int
    public let base: UnsafeMutableRawPointer
    private let mappedBytes: Int

    public var byteCount: Int { pageCount * GuestPage.size }

    /// Anonymous zero-filled memory.
    public init(pageCount: Int) throws(GeminusError) {
        precondition(pageCount > 0)
        let bytes = pageCount * GuestPage.size
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else {
            throw GeminusError(.resourceExhausted, "cannot map \(bytes >> 20) MiB of memory: \(String(cString: strerror(errno)))",
                               fix: "free memory on this host or protect a smaller VM")
        }
        self.pageCount = pageCount
        self.base = p
        self.mappedBytes = bytes
    }

    /// Maps a file shared, so writes go to the file and other mappings of it (QEMU's guest RAM
    /// file on tmpfs, or the replica file a standby QEMU will run on). With `create`, the file
    /// is created (or extended) to `pageCount` pages; otherwise it must already be that large.
    public init(fileAt path: String, pageCount: Int, create: Bool) throws(GeminusError) {
        precondition(pageCount > 0)
        let bytes = pageCount * GuestPage.size
        // Links are followed on purpose: LibvirtGuest.mapRAM maps through /proc/self/fd/N of a
        // descriptor it opened with O_NOFOLLOW and checked; callers check their paths.
        let fd = open(path, create ? (O_RDWR | O_CREAT | O_CLOEXEC) : (O_RDWR | O_CLOEXEC), 0o600)
        guard fd >= 0 else {
            throw GeminusError(.io, "cannot open guest memory file \(path): \(String(cString: strerror(errno)))",
                               fix: "check that the file exists and this agent may read and write it")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw GeminusError(.io, "cannot stat \(path): \(String(cString: strerror(errno)))") }
        if Int(st.st_size) < bytes {
            guard create, ftruncate(fd, off_t(bytes)) == 0 else {
                throw GeminusError(.io, "guest memory file \(path) holds \(st.st_size) bytes, \(bytes) expected",
                                   fix: create ? "free space on its filesystem" : "point the agent at the VM's RAM file")
            }
        }
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else {
            throw GeminusError(.resourceExhausted, "cannot map \(path): \(String(cString: strerror(errno)))")
        }
        self.pageCount = pageCount
        self.base = p
        self.mappedBytes = bytes
    }

    deinit { munmap(base, mappedBytes) }

    @inline(__always)
    public func page(_ index: Int) -> UnsafeMutableRawPointer {
        precondition(index >= 0 && index < pageCount, "page index out of range")
        return base + (index << GuestPage.shift)
    }

    /// Reads a little-endian u64 at a guest-physical address (the test guests keep a counter there).
    public func loadU64(at address: Int) -> UInt64 {
        precondition(address >= 0 && address + 8 <= byteCount)
        return UInt64(littleEndian: (base + address).loadUnaligned(as: UInt64.self))
    }

    public func storeU64(_ value: UInt64, at address: Int) {
        precondition(address >= 0 && address + 8 <= byteCount)
        (base + address).storeBytes(of: value.littleEndian, as: UInt64.self)
    }

    /// Whole-memory equality, for tests and the verification mode.
    public func contentsEqual(_ other: PageMemory) -> Bool {
        pageCount == other.pageCount && memcmp(base, other.base, byteCount) == 0
    }
}

/// A set of page indices as a bitmap: one bit per guest page (32 KiB for 1 GiB of RAM), so
/// marking a write is O(1) and listing the set is a scan of words.
public struct DirtyPageSet: Sendable {
    public let pageCount: Int
    private var words: [UInt64]
    public private(set) var count: Int = 0

    public init(pageCount: Int) {
        self.pageCount = pageCount
        words = Array(repeating: 0, count: (pageCount + 63) / 64)
    }

    @inline(__always)
    public mutating func insert(_ page: Int) {
        precondition(page >= 0 && page < pageCount, "page index out of range")
        let bit: UInt64 = 1 << UInt64(page & 63)
        if words[page >> 6] & bit == 0 {
            words[page >> 6] |= bit
            count += 1
        }
    }

    @inline(__always)
    public func contains(_ page: Int) -> Bool {
        page >= 0 && page < pageCount && words[page >> 6] & (1 << UInt64(page & 63)) != 0
    }

    public mutating func insertAll() {
        for i in words.indices { words[i] = ~0 }
        let tail = pageCount & 63
        if tail != 0 { words[words.count - 1] = (1 << UInt64(tail)) - 1 }
        count = pageCount
    }

    public mutating func removeAll() {
        for i in words.indices { words[i] = 0 }
        count = 0
    }

    /// Calls `body` with each member in ascending order.
    public func forEach(_ body: (Int) throws -> Void) rethrows {
        for (w, word) in words.enumerated() where word != 0 {
            var bits = word
            while bits != 0 {
                let b = bits.trailingZeroBitCount
                try body(w << 6 | b)
                bits &= bits - 1
            }
        }
    }

    public var sorted: [Int] {
        var out = [Int]()
        out.reserveCapacity(count)
        forEach { out.append($0) }
        return out
    }
}
