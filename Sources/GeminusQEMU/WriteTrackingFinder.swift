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

/// Where the preload library QEMU needs for write tracking is (Tools/uffd-preload/build.sh).
public enum WriteTrackingPreload {
    public static let fileName = "libgeminus-uffd-preload.so"
    /// Overrides the search: the library's full path.
    public static let environmentVariable = "GEMINUS_UFFD_PRELOAD"
    public static let buildHint = "build it with Tools/uffd-preload/build.sh (prints its path) and install it where QEMU's user can read it: install -D -m 0644 \"$(Tools/uffd-preload/build.sh)\" /usr/local/lib/geminus/\(fileName)"

    /// The directories searched, in order, after `GEMINUS_UFFD_PRELOAD`: beside this process's
    /// executable and up to two levels above it (a swift build tree keeps it in
    /// .build/geminus-uffd-preload/, the executables in .build/<triple>/<config>/), then the
    /// install locations.
    public static func searchDirectories() -> [String] {
        var dirs: [String] = []
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            var url = URL(fileURLWithPath: exe).deletingLastPathComponent()
            for _ in 0..<3 {
                dirs.append(url.path)
                dirs.append(url.appendingPathComponent("geminus-uffd-preload").path)
                url.deleteLastPathComponent()
            }
        }
        dirs += ["/usr/local/lib/geminus", "/usr/lib/geminus"]
        return dirs
    }

    /// The library's path, or nil when it is nowhere to be found.
    public static func locate() -> String? {
        if let p = ProcessInfo.processInfo.environment[environmentVariable], !p.isEmpty {
            return access(p, R_OK) == 0 ? p : nil
        }
        for d in searchDirectories() {
            let p = d + "/" + fileName
            if access(p, R_OK) == 0 { return p }
        }
        return nil
    }

    /// The library's path, or an error saying how to get it.
    public static func require() throws(GeminusError) -> String {
        guard let p = locate() else {
            let env = ProcessInfo.processInfo.environment[environmentVariable]
            throw GeminusError(.io, env.map { "\(environmentVariable)=\($0) is not a readable file" }
                                        ?? "the write-tracking preload library \(fileName) was not found (searched \(searchDirectories().joined(separator: ", ")))",
                               fix: buildHint + ", or set \(environmentVariable) to its path")
        }
        return p
    }
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
    private let deviceMajor: UInt32, deviceMinor: UInt32, inode: UInt64
    private var needsFull = true
    /// Why the next collect must be full (logged in stats when it happens).
    private var pendingResyncReason: String?
    /// Scan results of one ioctl loop: fixed capacity, the loop resumes where it stopped.
    private let vec: UnsafeMutablePointer<geminus_page_region>
    static let vecCapacity = 4096
    /// Ranges of the current epoch, collected before anything is copied so a failed scan leaves
    /// the buffer untouched. Bounded by the buffer's free pages (every range holds >= 1 page).
    private var ranges: [(start: UInt64, end: UInt64)] = []
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
        let maps = open("/proc/\(pid)/maps", O_RDONLY | O_CLOEXEC)
        guard maps >= 0 else {
            throw fail(GeminusError(.hypervisor, "cannot open /proc/\(pid)/maps: \(WriteTrackingFinder.errnoText(errno))",
                                    fix: "run the agent as root or as QEMU's user, and check that QEMU (pid \(pid)) still runs"))
        }
        self.mapsFD = maps
        self.pid = pid
        self.ramFilePath = ramFilePath
        self.reprotect = reprotect
        self.uffd = userfaultfd
        self.pagemapFD = pagemap
        self.ramFD = ramFD
        // glibc's dev_t encoding (gnu_dev_major/minor are macros Swift does not import).
        let dev = UInt64(st.st_dev)
        deviceMajor = UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff))
        deviceMinor = UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~0xff))
        inode = UInt64(st.st_ino)
        mapping = RAMMapping(start: 0, length: 0, fileOffset: 0, deviceMajor: 0, deviceMinor: 0, inode: 0, pieces: 0)
        vec = .allocate(capacity: WriteTrackingFinder.vecCapacity)
        vmas = .allocate(capacity: WriteTrackingFinder.vmaCapacity)

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
        close(mapsFD)
        vec.deallocate()
        vmas.deallocate()
    }

    // MARK: kernel support

    private static let probeResult: Int32 = geminus_write_tracking_probe()

    /// Whether this kernel has asynchronous write-protect and PAGEMAP_SCAN (Linux 6.7+), tried
    /// once per process on a scratch mapping. Nil when it works, else the reason.
    public static func probe() -> GeminusError? {
        let r = probeResult
        if r == 1 { return nil }
        let why: String
        switch -r {
        case ENOSYS: why = "this kernel has no userfaultfd (CONFIG_USERFAULTFD off)"
        case EPERM: why = "userfaultfd is not permitted here (seccomp, or vm.unprivileged_userfaultfd=0 on a kernel before 5.11)"
        case EINVAL, ENOTTY:
            why = "this kernel lacks asynchronous userfaultfd write-protect or PAGEMAP_SCAN (\(errnoText(-r)))"
        default: why = "the write-tracking self-test failed: \(errnoText(-r))"
        }
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return GeminusError(.hypervisor, "write tracking is unavailable on Linux \(release): \(why)",
                            fix: "write tracking needs Linux 6.7+ with CONFIG_USERFAULTFD and CONFIG_PTE_MARKER_UFFD_WP; use the compare method (ShadowCompareFinder) on this host")
    }

    public static func checkKernelSupport() throws(GeminusError) {
        if let e = probe() { throw e }
    }

    // MARK: devices that defeat tracking

    /// Device models that change guest RAM in ways the tracked mapping never sees, matched in the
    /// arguments of -device, -netdev, -object and -chardev (plain or JSON syntax).
    public static let untrackableDeviceMarkers: [(marker: String, why: String)] = [
        ("virtio-balloon", "balloon inflation and free-page reporting discard guest pages by hole punching, which is not reported"),
        ("virtio-mem", "virtio-mem unplugs guest memory by discarding it"),
        ("vhost-user", "a vhost-user backend writes guest RAM through its own mapping"),
        ("vfio", "a VFIO device writes guest RAM by DMA"),
    ]

    /// The arguments of `argv` (QEMU's command line) naming a device in `untrackableDeviceMarkers`.
    public static func untrackableDevices(inArguments argv: [String]) -> [(argument: String, why: String)] {
        var out: [(String, String)] = []
        for (i, a) in argv.enumerated() where i > 0 && ["-device", "-netdev", "-object", "-chardev"].contains(argv[i - 1]) {
            if let m = WriteTrackingFinder.untrackableDeviceMarkers.first(where: { a.contains($0.marker) }) { out.append((a, m.why)) }
        }
        return out
    }

    /// QEMU's argv, from /proc/PID/cmdline.
    static func commandLine(of pid: Int32) throws(GeminusError) -> [String] {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), !data.isEmpty else {
            throw GeminusError(.hypervisor, "cannot read /proc/\(pid)/cmdline", fix: "check that QEMU (pid \(pid)) still runs and the agent runs as root")
        }
        return data.split(separator: 0, omittingEmptySubsequences: true).map { String(decoding: $0, as: UTF8.self) }
    }

    // MARK: taking QEMU's descriptor

    /// The descriptor numbers of `pid` that are userfaultfds.
    public static func userfaultfdNumbers(of pid: Int32) throws(GeminusError) -> [Int32] {
        let dir = "/proc/\(pid)/fd"
        let names: [String]
        do { names = try FileManager.default.contentsOfDirectory(atPath: dir) } catch {
            throw GeminusError(.hypervisor, "cannot list \(dir): \(error.localizedDescription)",
                               fix: "check that QEMU (pid \(pid)) runs and that the agent runs as root or as QEMU's user")
        }
        var found: [Int32] = []
        var link = [CChar](repeating: 0, count: 256)
        for name in names {
            guard let n = Int32(name) else { continue }
            let len = readlink("\(dir)/\(name)", &link, link.count - 1)
            guard len > 0 else { continue }
            let target = link.withUnsafeBufferPointer { String(decoding: UnsafeRawBufferPointer($0).prefix(len), as: UTF8.self) }
            if target == "anon_inode:[userfaultfd]" { found.append(n) }
        }
        return found.sorted()
    }

    static func takeUserfaultfd(of pid: Int32) throws(GeminusError) -> Int32 {
        let numbers = try userfaultfdNumbers(of: pid)
        guard let number = numbers.first else {
            throw GeminusError(.hypervisor,
                               "QEMU (pid \(pid)) has no userfaultfd: QEMU was not started with the preload library \(WriteTrackingPreload.fileName), or the library could not create one (its reason is on QEMU's stderr)",
                               fix: "start QEMU with LD_PRELOAD=<path of \(WriteTrackingPreload.fileName)> (libvirt: <qemu:env name='LD_PRELOAD' value='…'/> in the domain's qemu:commandline); \(WriteTrackingPreload.buildHint); until then the compare method is used")
        }
        // Several would mean something else in QEMU uses userfaultfd too (postcopy): the
        // preload's is created first, before QEMU's main, so it has the lowest number.
        let pidfd = geminus_pidfd_open(pid)
        guard pidfd >= 0 else {
            throw GeminusError(.hypervisor, "pidfd_open(\(pid)) failed: \(errnoText(-pidfd))",
                               fix: -pidfd == ENOSYS ? "write tracking needs Linux 6.7+" : "check that QEMU (pid \(pid)) still runs")
        }
        defer { close(pidfd) }
        let fd = geminus_pidfd_getfd(pidfd, number)
        guard fd >= 0 else {
            throw GeminusError(.hypervisor, "cannot take QEMU's userfaultfd (pid \(pid), fd \(number)) with pidfd_getfd: \(errnoText(-fd))",
                               fix: -fd == EPERM ? "run the agent as root (pidfd_getfd needs ptrace access to QEMU)" : "write tracking needs Linux 5.6+ for pidfd_getfd and 6.7+ overall")
        }
        return fd
    }

    // MARK: the mapping

    /// QEMU's mapping of the RAM file now. Throws when there is none, or more than one region
    /// (a second mapping's writes would not be tracked), or it is not shared and writable.
    public func currentMapping() throws(GeminusError) -> RAMMapping {
        let regions = try readMappings()
        guard regions.count == 1, let m = regions.first else {
            if regions.isEmpty {
                throw GeminusError(.hypervisor, "process \(pid) has no mapping of the RAM file \(ramFilePath) (inode \(inode))",
                                   fix: "give the RAM file this QEMU maps (qom-get /objects/pc.ram mem-path); a RAM file replaced on disk after QEMU started is a different file")
            }
            throw GeminusError(.hypervisor, "process \(pid) maps the RAM file \(ramFilePath) in \(regions.count) separate regions (\(regions.map(\.description).joined(separator: "; "))): writes through all but one would be missed",
                               fix: "use the compare method for this VM; write tracking needs QEMU's RAM file mapped once")
        }
        return m
    }

    /// The RAM file's shared writable mappings in the process, adjacent VMAs with contiguous
    /// file offsets merged. It runs in every pause: PROCMAP_QUERY (Linux 6.11+, one ioctl per
    /// file-backed VMA) when the kernel has it, else the text of /proc/PID/maps.
    private func readMappings() throws(GeminusError) -> [RAMMapping] {
        if useProcmapQuery {
            let n = geminus_file_vmas(mapsFD, deviceMajor, deviceMinor, inode, vmas, WriteTrackingFinder.vmaCapacity)
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
                                   fix: n == -Int(ENOSPC) ? "the RAM file is mapped in more than \(WriteTrackingFinder.vmaCapacity) pieces: use the compare method"
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
                guard mapsBuffer.count < WriteTrackingFinder.mapsLimit else {
                    throw GeminusError(.resourceExhausted, "\(path) is larger than \(WriteTrackingFinder.mapsLimit >> 20) MiB", fix: "use the compare method for this VM")
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

extension QEMUGuestConfig {
    /// Has QEMU load the write-tracking preload library (`WriteTrackingPreload.locate()`).
    /// An `LD_PRELOAD` already in the environment is kept after it.
    public mutating func preloadWriteTracking(library: String) {
        let existing = environment["LD_PRELOAD"] ?? ProcessInfo.processInfo.environment["LD_PRELOAD"] ?? ""
        environment["LD_PRELOAD"] = existing.isEmpty ? library : "\(library) \(existing)"
    }
}

extension QEMUGuest {
    /// Starts a fresh guest like `launch` and chooses its dirty-page finder by `dirtyPages`
    /// once QEMU runs (write tracking needs its pid). `config` must already carry the preload
    /// library for tracking (`preloadWriteTracking`). With `.auto`, a guest that cannot be
    /// tracked gets the compare method and `fallback` hears why; with `.tracking` that is an
    /// error and QEMU is stopped again.
    public static func launch(_ config: QEMUGuestConfig, counterAddress: Int = QEMUGuest.tinyGuestCounterAddress,
                              dirtyPages: DirtyPagePolicy, fallback: (GeminusError) -> Void)
        throws(GeminusError) -> (guest: QEMUGuest, finder: any DirtyPageFinder) {
        let guest = try launch(config, counterAddress: counterAddress)
        do throws(GeminusError) {
            let finder = try dirtyPages.makeFinder(qemuPID: guest.process.pid, ramFilePath: config.ramFilePath, fallback: fallback)
            guest.useFinder(finder)
            return (guest, finder)
        } catch {
            guest.shutdown()
            throw error
        }
    }

    /// Starts a fresh guest like `launch`, with the preload library, and captures with write
    /// tracking (wrapped in `VerifyingFinder` when `verify`). When tracking cannot be set up
    /// (old kernel, library missing, ...) it uses `ShadowCompareFinder` and calls `fallback`
    /// once with the reason, so the caller logs one line. `finder` tells which.
    public static func launchTracked(_ config: QEMUGuestConfig, preloadLibrary: String? = WriteTrackingPreload.locate(),
                                     reprotect: WriteTrackingReprotect = .inScan, verify: Bool = false,
                                     allowUntrackableDevices: Bool = false,
                                     counterAddress: Int = QEMUGuest.tinyGuestCounterAddress,
                                     fallback: (GeminusError) -> Void) throws(GeminusError) -> (guest: QEMUGuest, finder: any DirtyPageFinder) {
        var config = config
        var policy = DirtyPagePolicy(method: .auto, verify: verify, reprotect: reprotect)
        policy.allowUntrackableDevices = allowUntrackableDevices
        if let lib = preloadLibrary {
            config.preloadWriteTracking(library: lib)
        } else {
            // No library: say why once (the kernel first, as the finder would), and do not look
            // for a descriptor QEMU cannot have.
            do throws(GeminusError) { _ = try WriteTrackingPreload.require() } catch {
                fallback(WriteTrackingFinder.probe() ?? error)
                policy.method = .compare
            }
        }
        return try launch(config, counterAddress: counterAddress, dirtyPages: policy, fallback: fallback)
    }
}
