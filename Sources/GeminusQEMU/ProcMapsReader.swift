import CGeminusSupport
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// A mapping of the guest RAM file in QEMU's address space, as /proc/PID/maps shows it (adjacent
/// lines of the same file with contiguous offsets merged: the kernel may split one mapping).
public struct RAMMapping: Equatable, Sendable, CustomStringConvertible {
    public var start: UInt64
    public var length: UInt64
    /// Offset in the RAM file of `start`.
    public var fileOffset: UInt64
    public var deviceMajor: UInt32
    public var deviceMinor: UInt32
    public var inode: UInt64
    /// Number of /proc/PID/maps lines merged into this one. Not part of equality: registering
    /// a range merges or splits VMAs without changing what is mapped.
    public var pieces: Int

    public static func == (a: RAMMapping, b: RAMMapping) -> Bool {
        a.start == b.start && a.length == b.length && a.fileOffset == b.fileOffset
            && a.deviceMajor == b.deviceMajor && a.deviceMinor == b.deviceMinor && a.inode == b.inode
    }

    public var end: UInt64 { start + length }
    public var description: String {
        "0x\(String(start, radix: 16))-0x\(String(end, radix: 16)) (\(length >> 20) MiB, file offset \(fileOffset), inode \(inode), \(pieces) piece\(pieces == 1 ? "" : "s"))"
    }
}

/// Reads where one process maps one file (the guest RAM file, by device and inode): its shared
/// writable mappings, adjacent VMAs with contiguous file offsets merged. It runs in every pause:
/// PROCMAP_QUERY (Linux 6.11+, one ioctl per file-backed VMA) when the kernel has it, else the
/// text of /proc/PID/maps, parsed with plain syscalls and byte loops.
final class ProcMapsReader {
    let pid: Int32
    let deviceMajor: UInt32, deviceMinor: UInt32, inode: UInt64
    /// /proc/PID/maps, kept open for PROCMAP_QUERY.
    private let mapsFD: Int32
    /// Internal so tests can force the text parser (the path of kernels before 6.11).
    var useProcmapQuery = true
    /// PROCMAP_QUERY results: the RAM file's VMAs (one, normally; more means split or mapped twice).
    private let vmas: UnsafeMutablePointer<geminus_file_vma>
    static let vmaCapacity = 256
    /// /proc/PID/maps read buffer; grows (to `mapsLimit`) only if QEMU has a large map.
    private var mapsBuffer = [UInt8](repeating: 0, count: 256 << 10)
    static let mapsLimit = 16 << 20

    /// Opens /proc/PID/maps of `pid`, for the file with device `major:minor` and `inode`.
    init(pid: Int32, deviceMajor: UInt32, deviceMinor: UInt32, inode: UInt64) throws(GeminusError) {
        let maps = open("/proc/\(pid)/maps", O_RDONLY | O_CLOEXEC)
        guard maps >= 0 else {
            throw GeminusError(.hypervisor, "cannot open /proc/\(pid)/maps: \(WriteTrackingFinder.errnoText(errno))",
                               fix: "run the agent as root or as QEMU's user, and check that QEMU (pid \(pid)) still runs")
        }
        self.mapsFD = maps
        self.pid = pid
        self.deviceMajor = deviceMajor
        self.deviceMinor = deviceMinor
        self.inode = inode
        vmas = .allocate(capacity: ProcMapsReader.vmaCapacity)
    }

    deinit {
        close(mapsFD)
        vmas.deallocate()
    }

    /// The file's shared writable mappings in the process now, merged as described above.
    func mappings() throws(GeminusError) -> [RAMMapping] {
        if useProcmapQuery {
            let n = geminus_file_vmas(mapsFD, deviceMajor, deviceMinor, inode, vmas, ProcMapsReader.vmaCapacity)
            if n >= 0 {
                var out: [RAMMapping] = []
                for k in 0..<n where vmas[k].shared_writable != 0 {
                    let v = vmas[k]
                    if var last = out.last, last.end == v.start, last.fileOffset + last.length == v.file_offset {
                        last.length += v.end - v.start
                        last.pieces += 1
                        out[out.count - 1] = last
                    } else {
                        out.append(RAMMapping(start: v.start, length: v.end - v.start, fileOffset: v.file_offset, deviceMajor: deviceMajor,
                                              deviceMinor: deviceMinor, inode: inode, pieces: 1))
                    }
                }
                return out
            }
            guard n == -Int(ENOTTY) || n == -Int(EINVAL) else {
                throw GeminusError(n == -Int(ENOSPC) ? .resourceExhausted : .hypervisor,
                                   "cannot list the mappings of process \(pid) (PROCMAP_QUERY): \(WriteTrackingFinder.errnoText(Int32(-n)))",
                                   fix: n == -Int(ENOSPC) ? "the RAM file is mapped in more than \(ProcMapsReader.vmaCapacity) pieces: use the compare method"
                                                          : "check that QEMU (pid \(pid)) still runs")
            }
            useProcmapQuery = false  // an older kernel: parse the text from now on
        }
        return try parseMapsText()
    }

    /// Parses /proc/PID/maps for the lines of the RAM file (device and inode), merging adjacent
    /// lines with contiguous file offsets. Plain syscalls and byte parsing: it runs in a pause.
    private func parseMapsText() throws(GeminusError) -> [RAMMapping] {
        let path = "/proc/\(pid)/maps"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw GeminusError(.hypervisor, "cannot open \(path): \(WriteTrackingFinder.errnoText(errno))", fix: "check that QEMU (pid \(pid)) still runs")
        }
        defer { close(fd) }
        var used = 0
        while true {
            if used == mapsBuffer.count {
                guard mapsBuffer.count < ProcMapsReader.mapsLimit else {
                    throw GeminusError(.resourceExhausted, "\(path) is larger than \(ProcMapsReader.mapsLimit >> 20) MiB", fix: "use the compare method for this VM")
                }
                mapsBuffer += [UInt8](repeating: 0, count: mapsBuffer.count)
            }
            let n = mapsBuffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + used, $0.count - used) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else {
                throw GeminusError(.hypervisor, "cannot read \(path): \(WriteTrackingFinder.errnoText(errno))", fix: "check that QEMU (pid \(pid)) still runs")
            }
            if n == 0 { break }
            used += n
        }
        var out: [RAMMapping] = []
        mapsBuffer.withUnsafeBufferPointer { b in
            var i = 0
            while i < used {
                var j = i
                while j < used && b[j] != 0x0A { j += 1 }
                if let m = parseMapsLine(b, i, j) {
                    if var last = out.last, last.end == m.start, last.fileOffset + last.length == m.fileOffset {
                        last.length += m.length
                        last.pieces += 1
                        out[out.count - 1] = last
                    } else {
                        out.append(m)
                    }
                }
                i = j + 1
            }
        }
        return out
    }

    /// One maps line `start-end perms offset major:minor inode path`, if it is the RAM file
    /// (and shared writable: a private or read-only mapping of it cannot be guest RAM).
    private func parseMapsLine(_ b: UnsafeBufferPointer<UInt8>, _ from: Int, _ to: Int) -> RAMMapping? {
        var i = from
        func hex(until stop: UInt8) -> UInt64? {
            var v: UInt64 = 0
            var any = false
            while i < to, b[i] != stop {
                let c = b[i]
                let d: UInt64
                switch c {
                case 0x30...0x39: d = UInt64(c - 0x30)
                case 0x61...0x66: d = UInt64(c - 0x61 + 10)
                default: return nil
                }
                v = v << 4 | d
                any = true
                i += 1
            }
            guard any, i < to else { return nil }
            i += 1
            return v
        }
        guard let start = hex(until: 0x2D), let end = hex(until: 0x20), i + 5 <= to else { return nil }
        let perms = (b[i], b[i + 1], b[i + 3])
        i += 5
        guard let offset = hex(until: 0x20), let major = hex(until: 0x3A), let minor = hex(until: 0x20) else { return nil }
        var ino: UInt64 = 0
        while i < to, b[i] >= 0x30, b[i] <= 0x39 { ino = ino * 10 + UInt64(b[i] - 0x30); i += 1 }
        guard ino == inode, UInt32(truncatingIfNeeded: major) == deviceMajor, UInt32(truncatingIfNeeded: minor) == deviceMinor,
              perms == (0x72, 0x77, 0x73) else { return nil }  // "rw" and "s"
        return RAMMapping(start: start, length: end - start, fileOffset: offset, deviceMajor: deviceMajor,
                          deviceMinor: deviceMinor, inode: ino, pieces: 1)
    }
}
