import CGeminusSupport
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// How written pages are write-protected again after each scan. Both are exact while the vCPUs
/// are stopped; they differ in what the kernel does to the rest of guest RAM.
public enum WriteTrackingReprotect: String, Sendable, CaseIterable {
    /// One PAGEMAP_SCAN both reports the written pages and re-protects them
    /// (PM_SCAN_WP_MATCHING): atomic, one ioctl. The default: under TCG (all that runs here) it
    /// is the cheapest and a write can never fall between report and re-protect. Under KVM the
    /// kernel then invalidates the second-level mappings of the *whole* scanned range (one
    /// mmu-notifier call), so every guest page faults into KVM again after `cont`.
    case inScan = "in-scan"
    /// PAGEMAP_SCAN without re-protecting, then UFFDIO_WRITEPROTECT of each returned range only:
    /// KVM loses only the mappings of the pages that were written. Costs one ioctl per range
    /// (notes: 4 GiB, 12.8 ms for 10,000 scattered ranges) and relies on nothing writing guest
    /// RAM between the scan and the protect, true while QEMU is stopped (device emulation too).
    /// Not measured under KVM here (KVM cannot run guests on this machine).
    case returnedRanges = "returned-ranges"
}

/// Counters and the last epoch's timings, for `geminus status`, logs and the benchmark.
public struct WriteTrackingStats: Sendable, Equatable {
    /// Calls to `collect`.
    public var epochs = 0
    /// Epochs answered with a full copy (the first, asked-for ones, and resyncs).
    public var fullCopies = 0
    /// Full copies forced by a problem (mapping changed, scan failed): each is logged.
    public var resyncs = 0
    /// Why the last resync happened.
    public var lastResyncReason: String?
    /// Whether the last `collect` copied every page.
    public var lastWasFull = false
    /// Scans whose result was out of order or repeated pages (merged: see `collect`).
    public var reorderedScans = 0
    /// Last delta epoch: ranges and pages the scan returned, and where the time went.
    public var lastRanges = 0
    public var lastPages = 0
    public var lastScanNanos: UInt64 = 0
    public var lastMappingCheckNanos: UInt64 = 0
    public var lastCopyNanos: UInt64 = 0
    /// Last full copy: write-protecting all of RAM, then copying it.
    public var lastProtectAllNanos: UInt64 = 0
    public var lastFullCopyNanos: UInt64 = 0
}

/// The "write tracking" method (DESIGN.md, notes/write-tracking.md): QEMU's guest RAM mapping is
/// registered with a userfaultfd that lives in QEMU (created there by the preload library) in
/// asynchronous write-protect mode, so the kernel notes each first write to a page without
/// stopping the guest; at each checkpoint one PAGEMAP_SCAN of /proc/PID/pagemap lists the pages
/// written since the last one and protects them again. The pause grows with the pages written,
/// not with the guest's size.
///
/// Exactness: the scan only sees writes made through the tracked mapping. This finder therefore
/// re-reads QEMU's mapping of the RAM file every epoch, refuses a RAM file mapped more than once,
/// and answers any change, any scan error, any page count mismatch with a full copy after
/// registering the mapping again, or with an error; never with an empty or partial epoch.
/// Not detected here (refuse them where the VM is enrolled): pages discarded by hole punching
/// or MADV_REMOVE (virtio-balloon, free-page reporting, virtio-mem), writes by other processes
/// or mappings (vhost-user, VFIO DMA, pwrite to the file).
///
/// `memory` given to `collect` must be this agent's mapping of the same RAM file (page index =
/// file offset / 4096). Call `collect` only while QEMU is stopped.
///
/// The parts, one file each: the preload library QEMU must load (WriteTrackingPreload.swift),
/// the kernel probe (WriteTrackingKernelProbe.swift), the devices tracking cannot see
/// (UntrackableDevices.swift), taking QEMU's userfaultfd (UserfaultfdTheft.swift) and reading
/// QEMU's mapping of the RAM file (ProcMapsReader.swift). This file registers, scans and copies.
public final class WriteTrackingFinder: DirtyPageFinder {
    public let pid: Int32
    public let ramFilePath: String
    public let reprotect: WriteTrackingReprotect
    /// The mapping registered for tracking.
    public private(set) var mapping: RAMMapping
    public private(set) var stats = WriteTrackingStats()
    public var methodName: String { "write-tracking" }
    public var statusReport: [String: String] {
        var r = ["trackingResyncs": "\(stats.resyncs)"]
        if let why = stats.lastResyncReason { r["trackingLastResync"] = why }
        return r
    }

    private let uffd: Int32
    private let pagemapFD: Int32
    private let ramFD: Int32
    private var needsFull = true
    /// Why the next collect must be full (logged in stats when it happens).
    private var pendingResyncReason: String?
    /// Scan results of one ioctl loop: fixed capacity, the loop resumes where it stopped.
    private let vec: UnsafeMutablePointer<geminus_page_region>
    static let vecCapacity = 4096
    /// Ranges of the current epoch, collected before anything is copied so a failed scan leaves
    /// the buffer untouched. Bounded by the buffer's free pages (every range holds >= 1 page).
    private var ranges: [(start: UInt64, end: UInt64)] = []
    /// Where QEMU maps the RAM file (ProcMapsReader.swift), read in every pause.
    private let maps: ProcMapsReader
    /// Internal so tests can force the text parser (the path of kernels before 6.11).
    var useProcmapQuery: Bool {
        get { maps.useProcmapQuery }
        set { maps.useProcmapQuery = newValue }
    }

    /// Tracks the QEMU process `qemuPID`, whose guest RAM is the file `ramFilePath` (QEMU's
    /// `mem-path`), through the userfaultfd the preload library created in it. Registers the
    /// mapping but protects nothing yet: the first `collect` does (a full copy).
    ///
    /// Throws, with the cause and the fix, when tracking cannot be set up: the kernel lacks it
    /// (before Linux 6.7), QEMU was not started with the preload library, the agent may not
    /// take QEMU's descriptors, or QEMU's RAM mapping is not one plain shared mapping of the
    /// file. A caller then uses `ShadowCompareFinder` and logs the error once.
    ///
    /// It also refuses a QEMU whose command line has a device that changes guest RAM without
    /// the tracked mapping seeing it (`untrackableDevices`): a balloon or virtio-mem (discards),
    /// vhost-user or VFIO (writes by another process or by DMA). `allowUntrackableDevices`
    /// skips that check (then run `VerifyingFinder` to see what is missed).
    public convenience init(qemuPID: Int32, ramFilePath: String, reprotect: WriteTrackingReprotect = .inScan,
                            allowUntrackableDevices: Bool = false) throws(GeminusError) {
        try WriteTrackingFinder.checkKernelSupport()
        if !allowUntrackableDevices {
            let found = WriteTrackingFinder.untrackableDevices(inArguments: try WriteTrackingFinder.commandLine(of: qemuPID))
            guard found.isEmpty else {
                throw GeminusError(.hypervisor,
                                   "QEMU (pid \(qemuPID)) has devices write tracking cannot see: \(found.map { "\($0.argument) (\($0.why))" }.joined(separator: "; "))",
                                   fix: "remove them (libvirt: <memballoon model='none'/>, no virtio-mem, vhost-user or hostdev), or use the compare method for this VM")
            }
        }
        let uffd = try WriteTrackingFinder.takeUserfaultfd(of: qemuPID)
        try self.init(pid: qemuPID, ramFilePath: ramFilePath, userfaultfd: uffd, reprotect: reprotect)
    }

    /// Tracks the calling process's own mapping of `ramFilePath` (which must already be mapped
    /// once, shared). The mechanism is the same as for QEMU; tests use it to force mapping
    /// changes that QEMU cannot be made to do.
    public static func trackingThisProcess(ramFilePath: String, reprotect: WriteTrackingReprotect = .inScan) throws(GeminusError) -> WriteTrackingFinder {
        try checkKernelSupport()
        let fd = geminus_uffd_create()
        guard fd >= 0 else { throw GeminusError(.hypervisor, "cannot create a userfaultfd in this process: \(errnoText(-fd))") }
        return try WriteTrackingFinder(pid: getpid(), ramFilePath: ramFilePath, userfaultfd: fd, reprotect: reprotect)
    }

    /// Takes ownership of `userfaultfd` (closed on failure too).
    init(pid: Int32, ramFilePath: String, userfaultfd: Int32, reprotect: WriteTrackingReprotect) throws(GeminusError) {
        var fds: [Int32] = [userfaultfd]
        func fail(_ e: GeminusError) -> GeminusError {
            for fd in fds { close(fd) }
            return e
        }
        var st = stat()
        let ramFD = open(ramFilePath, O_RDONLY | O_CLOEXEC)
        guard ramFD >= 0, fstat(ramFD, &st) == 0 else {
            let e = errno
            if ramFD >= 0 { close(ramFD) }
            throw fail(GeminusError(.io, "cannot open the guest RAM file \(ramFilePath): \(WriteTrackingFinder.errnoText(e))",
                                    fix: "give the path QEMU maps (its memory-backend-file mem-path; qom-get /objects/pc.ram mem-path)"))
        }
        fds.append(ramFD)
        let pagemap = open("/proc/\(pid)/pagemap", O_RDONLY | O_CLOEXEC)
        guard pagemap >= 0 else {
            throw fail(GeminusError(.hypervisor, "cannot open /proc/\(pid)/pagemap: \(WriteTrackingFinder.errnoText(errno))",
                                    fix: "run the agent as root or as QEMU's user, and check that QEMU (pid \(pid)) still runs"))
        }
        fds.append(pagemap)
        // glibc's dev_t encoding (gnu_dev_major/minor are macros Swift does not import).
        let dev = UInt64(st.st_dev)
        do throws(GeminusError) {
            maps = try ProcMapsReader(pid: pid, deviceMajor: UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)),
                                      deviceMinor: UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~0xff)),
                                      inode: UInt64(st.st_ino))
        } catch {
            throw fail(error)
        }
        self.pid = pid
        self.ramFilePath = ramFilePath
        self.reprotect = reprotect
        self.uffd = userfaultfd
        self.pagemapFD = pagemap
        self.ramFD = ramFD
        mapping = RAMMapping(start: 0, length: 0, fileOffset: 0, deviceMajor: 0, deviceMinor: 0, inode: 0, pieces: 0)
        vec = .allocate(capacity: WriteTrackingFinder.vecCapacity)

        // UFFDIO_API once per descriptor: EINVAL after the kernel probe passed means an earlier
        // agent configured it already (agent restart); the verify scan below checks that it is
        // in async mode (EPERM otherwise).
        // Every stored property is set: from here on a throw runs deinit, which closes all.
        let api = geminus_uffd_api_wp_async(uffd, nil)
        guard api == 0 || api == -EINVAL else {
            throw GeminusError(.hypervisor, "UFFDIO_API on QEMU's userfaultfd failed: \(WriteTrackingFinder.errnoText(-api))",
                               fix: "use the compare method (ShadowCompareFinder)")
        }
        let m = try currentMapping()
        try register(m)
        mapping = m
    }

    deinit {
        // Leave QEMU as it was: unprotected pages cost its vCPUs no faults once nobody tracks.
        if mapping.length > 0 {
            _ = geminus_uffd_writeprotect(uffd, mapping.start, mapping.length, 0)
            _ = geminus_uffd_unregister(uffd, mapping.start, mapping.length)
        }
        close(uffd)
        close(pagemapFD)
        close(ramFD)
        vec.deallocate()
    }

    // MARK: the mapping

    /// QEMU's mapping of the RAM file now. Throws when there is none, or more than one region
    /// (a second mapping's writes would not be tracked), or it is not shared and writable.
    public func currentMapping() throws(GeminusError) -> RAMMapping {
        let regions = try maps.mappings()
        guard regions.count == 1, let m = regions.first else {
            if regions.isEmpty {
                throw GeminusError(.hypervisor, "process \(pid) has no mapping of the RAM file \(ramFilePath) (inode \(maps.inode))",
                                   fix: "give the RAM file this QEMU maps (qom-get /objects/pc.ram mem-path); a RAM file replaced on disk after QEMU started is a different file")
            }
            throw GeminusError(.hypervisor, "process \(pid) maps the RAM file \(ramFilePath) in \(regions.count) separate regions (\(regions.map(\.description).joined(separator: "; "))): writes through all but one would be missed",
                               fix: "use the compare method for this VM; write tracking needs QEMU's RAM file mapped once")
        }
        return m
    }



    /// Registers `m` with the userfaultfd and checks, with a non-protecting scan, that the kernel
    /// treats all of it as async write-protect (EPERM otherwise).
    private func register(_ m: RAMMapping) throws(GeminusError) {
        let r = geminus_uffd_register_wp(uffd, m.start, m.length)
        guard r == 0 else {
            throw GeminusError(.hypervisor, "cannot register QEMU's RAM mapping \(m) for write-protect: \(WriteTrackingFinder.errnoText(-r))",
                               fix: -r == EINVAL ? "write tracking needs Linux 6.7+ and a shmem/tmpfs or anonymous RAM backend (hugetlbfs needs WP_HUGETLBFS_SHMEM support); use the compare method"
                                                 : "use the compare method (ShadowCompareFinder)")
        }
        var next: UInt64 = 0
        let n = geminus_pagemap_scan_written(pagemapFD, m.start, m.end, 0, vec, 1, &next)
        guard n >= 0 else {
            throw GeminusError(.hypervisor, "QEMU's RAM mapping \(m) is not in asynchronous write-protect mode after registering: \(WriteTrackingFinder.errnoText(Int32(-n)))",
                               fix: -n == ENOTTY ? "write tracking needs Linux 6.7+ (PAGEMAP_SCAN); use the compare method"
                                                 : "QEMU's userfaultfd was configured without WP_ASYNC (by another program?): restart QEMU, or use the compare method")
        }
    }

    // MARK: collecting

    public func collect(from memory: PageMemory, full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        stats.epochs += 1
        stats.lastWasFull = false
        if full || needsFull {
            try fullCopy(memory, into: buffer)
            return
        }
        let room = buffer.limitPages - buffer.pageCount
        ranges.removeAll(keepingCapacity: true)
        var pages = 0
        var lastEnd: UInt64 = 0
        let t0 = Monotonic.nanos()
        var at = mapping.start
        let end = mapping.end
        while at < end {
            var next: UInt64 = 0
            let n = geminus_pagemap_scan_written(pagemapFD, at, end, reprotect == .inScan ? 1 : 0, vec,
                                                 WriteTrackingFinder.vecCapacity, &next)
            guard n >= 0 else {
                // EPERM: part of the range is no longer the registered mapping (mapped over).
                try resync(memory, into: buffer, reason: "PAGEMAP_SCAN of \(mapping) failed: \(WriteTrackingFinder.errnoText(Int32(-n)))")
                return
            }
            var ordered = true
            for k in 0..<Int(n) {
                let r = vec[k]
                if r.start < lastEnd { ordered = false }
                lastEnd = max(lastEnd, r.end)
                pages += Int((r.end - r.start) >> GuestPage.shift)
                ranges.append((r.start, r.end))
            }
            if !ordered {
                // Seen on Linux 6.18 without PM_SCAN_WP_MATCHING: one ioctl restarts its walk
                // part way and reports the same pages again (1,506 entries for 1,009 written
                // pages). Take the union: sort, merge, count again. Never drop a page.
                stats.reorderedScans += 1
                pages = normalizeRanges()
            }
            guard pages <= room else {
                // Scanned pages are protected again but not copied: only a full copy can recover.
                needsFull = true
                throw GeminusError(.resourceExhausted,
                                   "capture buffer holds \(buffer.limitPages) pages and the guest wrote more",
                                   fix: "raise the checkpoint buffer limit or shorten the epoch")
            }
            at = next
        }
        let t1 = Monotonic.nanos()
        // After the scan, so a change made before or during it is seen: an unmapped piece is
        // skipped by the scan without an error, so only this check catches it.
        let now: RAMMapping
        do throws(GeminusError) { now = try currentMapping() } catch {
            needsFull = true
            throw error
        }
        guard now == mapping else {
            try resync(memory, into: buffer, reason: "QEMU's RAM mapping changed from \(mapping) to \(now)")
            return
        }
        guard now.length == UInt64(memory.byteCount), now.fileOffset == 0 else {
            needsFull = true
            throw mismatch(now, memory)
        }
        let t2 = Monotonic.nanos()
        if reprotect == .returnedRanges {
            for r in ranges {
                let e = geminus_uffd_writeprotect(uffd, r.start, r.end - r.start, 1)
                guard e == 0 else {
                    try resync(memory, into: buffer, reason: "re-protecting \(r.start)-\(r.end) failed: \(WriteTrackingFinder.errnoText(-e))")
                    return
                }
            }
        }
        let base = mapping.start
        for r in ranges {
            // A range is contiguous in guest RAM and, appended back to back, in the buffer:
            // one copy per range.
            let firstPage = Int((r.start - base) >> GuestPage.shift)
            let count = Int((r.end - r.start) >> GuestPage.shift)
            let firstSlot = buffer.pageCount
            for k in 0..<count where buffer.appendPage(index: firstPage + k) == nil {
                needsFull = true
                throw GeminusError(.internalInvariant, "capture buffer refused page \(firstPage + k) after room was checked")
            }
            buffer.contents(at: firstSlot).copyMemory(from: memory.page(firstPage), byteCount: count * GuestPage.size)
        }
        let t3 = Monotonic.nanos()
        stats.lastRanges = ranges.count
        stats.lastPages = pages
        stats.lastScanNanos = t1 - t0
        stats.lastMappingCheckNanos = t2 - t1
        stats.lastCopyNanos = t3 - t2
    }

    /// Sorts `ranges` and merges overlapping or adjacent ones, so every page appears once and
    /// in ascending order; returns the number of pages.
    private func normalizeRanges() -> Int {
        ranges.sort { $0.start < $1.start }
        var out = 0
        var pages = 0
        for r in ranges {
            if out > 0, r.start <= ranges[out - 1].end {
                ranges[out - 1].end = max(ranges[out - 1].end, r.end)
            } else {
                ranges[out] = r
                out += 1
            }
        }
        ranges.removeLast(ranges.count - out)
        for r in ranges { pages += Int((r.end - r.start) >> GuestPage.shift) }
        return pages
    }

    /// Answers a problem with a full copy after registering the mapping again, recording why.
    private func resync(_ memory: PageMemory, into buffer: CheckpointBuffer, reason: String) throws(GeminusError) {
        stats.resyncs += 1
        stats.lastResyncReason = reason
        needsFull = true
        pendingResyncReason = reason
        try fullCopy(memory, into: buffer)
    }

    private func mismatch(_ m: RAMMapping, _ memory: PageMemory) -> GeminusError {
        GeminusError(.hypervisor, "QEMU's RAM mapping \(m) does not cover the guest's \(memory.byteCount) bytes from file offset 0",
                     fix: "RAM was resized or hot-plugged: re-enrol the VM (a new finder for the new layout)")
    }

    /// Registers the current mapping (again, if it changed or after a failure), write-protects
    /// all of it, then copies every page. Protect before copy: any write after the protect,
    /// even one we would not expect while QEMU is stopped, shows in the next scan.
    private func fullCopy(_ memory: PageMemory, into buffer: CheckpointBuffer) throws(GeminusError) {
        needsFull = true  // until this completes
        guard buffer.limitPages - buffer.pageCount >= memory.pageCount else {
            throw GeminusError(.resourceExhausted,
                               "capture buffer holds \(buffer.limitPages) pages, a full copy needs \(memory.pageCount)",
                               fix: "raise the checkpoint buffer limit to the guest's page count")
        }
        let now = try currentMapping()
        if pendingResyncReason != nil || now != mapping {
            if now != mapping { _ = geminus_uffd_unregister(uffd, mapping.start, mapping.length) }
            try register(now)
            mapping = now
        }
        guard now.length == UInt64(memory.byteCount), now.fileOffset == 0 else { throw mismatch(now, memory) }
        let t0 = Monotonic.nanos()
        let e = geminus_uffd_writeprotect(uffd, mapping.start, mapping.length, 1)
        guard e == 0 else {
            throw GeminusError(.hypervisor, "cannot write-protect QEMU's RAM mapping \(mapping): \(WriteTrackingFinder.errnoText(-e))",
                               fix: "use the compare method (ShadowCompareFinder)")
        }
        let t1 = Monotonic.nanos()
        try copyAll(memory, into: buffer)
        let t2 = Monotonic.nanos()
        pendingResyncReason = nil
        needsFull = false
        stats.fullCopies += 1
        stats.lastWasFull = true
        stats.lastProtectAllNanos = t1 - t0
        stats.lastFullCopyNanos = t2 - t1
    }

    /// Every page, read from the RAM file with pread rather than through `memory`: a read fault
    /// on a hole of a tmpfs file through a shared mapping allocates a page, pread returns zeros.
    private func copyAll(_ memory: PageMemory, into buffer: CheckpointBuffer) throws(GeminusError) {
        let chunk = 64  // pages per pread: 256 KiB
        var page = 0
        while page < memory.pageCount {
            let count = min(chunk, memory.pageCount - page)
            let first = buffer.pageCount
            for k in 0..<count {
                guard buffer.appendPage(index: page + k) != nil else {
                    throw GeminusError(.internalInvariant, "capture buffer refused page \(page + k) after room was checked")
                }
            }
            // Slots appended back to back are contiguous (the buffer grows by moving everything).
            let dst = buffer.contents(at: first)
            let bytes = count * GuestPage.size
            var done = 0
            while done < bytes {
                let n = pread(ramFD, dst + done, bytes - done, off_t(page * GuestPage.size + done))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    throw GeminusError(.io, "cannot read the guest RAM file \(ramFilePath) at page \(page): \(n == 0 ? "end of file" : WriteTrackingFinder.errnoText(errno))",
                                       fix: "the RAM file must hold the whole guest (QEMU's mem-path)")
                }
                done += n
            }
            page += count
        }
    }

    static func errnoText(_ e: Int32) -> String { "\(String(cString: strerror(e))) (errno \(e))" }
}
