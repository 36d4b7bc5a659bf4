import CGeminusSupport
import Foundation
import Testing
import GeminusCore
import GeminusHypervisor
@testable import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// Builds what the write-tracking tests need, once per test process: the preload library
/// (Tools/uffd-preload/build.sh) and the stand-in target process (test-target.c).
enum WTEnv {
    static let directory = NSTemporaryDirectory() + "geminus-wt-tests-\(getpid())"

    static let preload: Result<String, GeminusError> = {
        atexit { _ = try? FileManager.default.removeItem(atPath: WTEnv.directory) }
        return run("/bin/bash", [VMEnv.repoRoot + "/Tools/uffd-preload/build.sh", directory])
    }()

    static let target: Result<String, GeminusError> = {
        _ = preload  // registers the cleanup
        let out = directory + "/test-target"
        return run("/usr/bin/env", ["gcc", "-O2", "-Wall", "-Werror", "-o", out, VMEnv.repoRoot + "/Tools/uffd-preload/test-target.c"]).map { _ in out }
    }()

    private static func run(_ exe: String, _ args: [String]) -> Result<String, GeminusError> {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        do { try p.run() } catch { return .failure(GeminusError(.io, "cannot run \(exe): \(error)")) }
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            return .failure(GeminusError(.io, "\(args.joined(separator: " ")) failed: \(String(decoding: e, as: UTF8.self))",
                                         fix: "apt-get install -y gcc"))
        }
        return .success(String(decoding: o, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
    }

    static func require(_ r: Result<String, GeminusError>, sourceLocation: SourceLocation = #_sourceLocation) -> String? {
        switch r {
        case .success(let p): return p
        case .failure(let e):
            Issue.record("\(e)", sourceLocation: sourceLocation)
            return nil
        }
    }

    nonisolated(unsafe) private static var serial = 0
    private static let lock = NSLock()

    /// A fresh RAM file in /dev/shm (the test-file prefix the leftover check knows).
    static func ramFile(pages: Int) throws -> (path: String, memory: PageMemory) {
        lock.lock()
        serial += 1
        let n = serial
        lock.unlock()
        let path = "/dev/shm/gq-\(getpid())-wt\(n).ram"
        unlink(path)
        return (path, try PageMemory(fileAt: path, pageCount: pages, create: true))
    }
}

/// A process standing in for QEMU (Tools/uffd-preload/test-target.c): maps the RAM file once
/// and writes pages or changes its mapping on command.
final class TargetProcess {
    let process = Process()
    private let input = Pipe(), output = Pipe()
    var pid: Int32 { process.processIdentifier }

    init(executable: String, ramFile: String, pages: Int, preload: String?) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = [ramFile, String(pages)]
        if let preload {
            process.environment = ProcessInfo.processInfo.environment.merging(["LD_PRELOAD": preload]) { _, n in n }
        }
        process.standardInput = input
        process.standardOutput = output
        try process.run()
        let first = readLine()
        guard first == "ready" else { throw GeminusError(.io, "test-target did not start: '\(first)'") }
    }

    private func readLine() -> String {
        var bytes: [UInt8] = []
        var c: UInt8 = 0
        while read(output.fileHandleForReading.fileDescriptor, &c, 1) == 1 {
            if c == 0x0A { break }
            bytes.append(c)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Sends one command; returns its reply ("ok" or "err N").
    @discardableResult
    func send(_ command: String) -> String {
        input.fileHandleForWriting.write(Data((command + "\n").utf8))
        return readLine()
    }

    func stop() {
        if process.isRunning {
            _ = send("q")
            process.waitUntilExit()
        }
    }
}

/// A random set of page runs, as (start, end) pairs, and their union.
private func randomRuns(pages: Int, runs: Int, maxLength: Int, using rng: inout some RandomNumberGenerator) -> ([(Int, Int)], Set<Int>) {
    var out: [(Int, Int)] = []
    var all = Set<Int>()
    for _ in 0..<runs {
        let len = Int.random(in: 1...maxLength, using: &rng)
        let a = Int.random(in: 0...(pages - len), using: &rng)
        out.append((a, a + len))
        for p in a..<(a + len) { all.insert(p) }
    }
    return (out, all)
}

/// Write tracking on processes this test controls: the kernel mechanism, exactness, the scan's
/// resume loop, mapping changes QEMU cannot be made to do, and agent restart.
@Suite(.serialized)
struct WriteTrackingLocalTests {
    /// `--dirty-pages tracking` refuses at the start; a guest a standby has just resumed runs
    /// already, so it falls back to compare and says why instead of failing the resume.
    @Test func trackingIsRefusedAtTheStartButNotForAResumedGuest() throws {
        let policy = DirtyPagePolicy(method: .tracking)
        var heard: [GeminusError] = []
        #expect(throws: GeminusError.self) {
            _ = try policy.makeFinder(qemuPID: nil, ramFilePath: "/nonexistent", fallback: { heard.append($0) })
        }
        #expect(heard.isEmpty)
        let resumed = policy.makeFinderForResumedGuest(qemuPID: nil, ramFilePath: "/nonexistent", fallback: { heard.append($0) })
        #expect(resumed is ShadowCompareFinder)
        #expect(heard.count == 1 && heard.first?.message.contains("cannot be tracked") == true, "\(heard)")
        heard.removeAll()
        #expect(DirtyPagePolicy.compare.makeFinderForResumedGuest(qemuPID: nil, ramFilePath: "/x", fallback: { heard.append($0) }) is ShadowCompareFinder)
        #expect(heard.isEmpty)
    }

    @Test func kernelSupportsWriteTracking() {
        // Linux 6.18 here. On a kernel before 6.7 this fails with the reason and the fix.
        let e = WriteTrackingFinder.probe()
        #expect(e == nil, "\(e.map(String.init(describing:)) ?? "")")
    }

    /// The C scan helper with a result buffer far smaller than the result: it must stop when
    /// the buffer fills, say where, and resume there until the whole range is done.
    @Test func scanHelperResumesWhenItsBufferFills() throws {
        let pages = 257
        let bytes = pages * 4096
        let m = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)!
        #expect(m != MAP_FAILED)
        defer { munmap(m, bytes) }
        let uffd = geminus_uffd_create()
        #expect(uffd >= 0)
        defer { close(uffd) }
        let pm = open("/proc/self/pagemap", O_RDONLY)
        defer { close(pm) }
        let s = UInt64(UInt(bitPattern: m))
        #expect(geminus_uffd_api_wp_async(uffd, nil) == 0)
        #expect(geminus_uffd_api_wp_async(uffd, nil) == -EINVAL, "a second UFFDIO_API is refused (the agent-restart case)")
        #expect(geminus_uffd_register_wp(uffd, s, UInt64(bytes)) == 0)
        #expect(geminus_uffd_writeprotect(uffd, s, UInt64(bytes), 1) == 0)
        let written = Set(stride(from: 0, to: pages, by: 2))  // 129 separate ranges
        for p in written { (m + p * 4096).storeBytes(of: 1, as: UInt8.self) }
        var vec = [geminus_page_region](repeating: geminus_page_region(), count: 7)
        var at = s, calls = 0
        var seen = Set<Int>()
        while at < s + UInt64(bytes) {
            var next: UInt64 = 0
            let n = geminus_pagemap_scan_written(pm, at, s + UInt64(bytes), 1, &vec, 7, &next)
            #expect(n >= 0 && n <= 7)
            guard n >= 0 else { break }
            #expect(next > at || n > 0)
            for k in 0..<n {
                for a in stride(from: vec[k].start, to: vec[k].end, by: 4096) { seen.insert(Int((a - s) / 4096)) }
            }
            at = next
            calls += 1
        }
        #expect(seen == written)
        #expect(calls >= 129 / 7)
        // Re-protected by the scan: nothing is written now.
        var next: UInt64 = 0
        #expect(geminus_pagemap_scan_written(pm, s, s + UInt64(bytes), 1, &vec, 7, &next) == 0)
        #expect(next == s + UInt64(bytes))
        // An unregistered range fails the scan (CHECK_WPASYNC), it is not "nothing written".
        #expect(geminus_uffd_unregister(uffd, s, 4096) == 0)
        #expect(geminus_pagemap_scan_written(pm, s, s + UInt64(bytes), 1, &vec, 7, &next) == -EPERM)
    }

    @Test(arguments: WriteTrackingReprotect.allCases)
    func trackedSetIsExactlyThePagesWritten(reprotect: WriteTrackingReprotect) throws {
        guard let preload = WTEnv.require(WTEnv.preload), let exe = WTEnv.require(WTEnv.target) else { return }
        let pages = 2048
        let (path, memory) = try WTEnv.ramFile(pages: pages)
        defer { unlink(path) }
        let target = try TargetProcess(executable: exe, ramFile: path, pages: pages, preload: preload)
        defer { target.stop() }
        let finder = try WriteTrackingFinder(qemuPID: target.pid, ramFilePath: path, reprotect: reprotect)
        #expect(finder.mapping.length == UInt64(pages * 4096) && finder.mapping.fileOffset == 0)
        let buffer = CheckpointBuffer(limitPages: pages)
        try finder.collect(from: memory, full: false, into: buffer)
        #expect(buffer.pageCount == pages && finder.stats.lastWasFull, "the first collect is a full copy")
        var rng = Xoshiro256(seed: 42)
        var total = 0
        for round in 0..<200 {
            let (runs, expected) = round % 10 == 9 ? ([], Set<Int>()) : randomRuns(pages: pages, runs: Int.random(in: 1...6, using: &rng), maxLength: 40, using: &rng)
            for (a, b) in runs { #expect(target.send("w \(a) \(b)") == "ok") }
            buffer.reset()
            try finder.collect(from: memory, full: false, into: buffer)
            #expect(!finder.stats.lastWasFull)
            #expect(buffer.pageIndices == expected.sorted(), "round \(round)")
            for i in 0..<buffer.pageCount {
                #expect(memcmp(buffer.contents(at: i), memory.page(buffer.pageIndices[i]), 4096) == 0)
            }
            total += expected.count
        }
        #expect(total > 1000)
        #expect(finder.stats.resyncs == 0)
        // Asked-for full copies work in the middle too, and tracking goes on after them.
        buffer.reset()
        try finder.collect(from: memory, full: true, into: buffer)
        #expect(buffer.pageCount == pages)
        #expect(target.send("w 100 103") == "ok")
        buffer.reset()
        try finder.collect(from: memory, full: false, into: buffer)
        #expect(buffer.pageIndices == [100, 101, 102])
    }

    /// PROCMAP_QUERY (6.11+) and the /proc/PID/maps text (older kernels) see the same mapping,
    /// and both see a change.
    @Test func bothMappingReadersAgree() throws {
        try withTarget(pages: 256) { target, finder, memory, buffer in
            let viaQuery = try finder.currentMapping()
            finder.useProcmapQuery = false
            let viaText = try finder.currentMapping()
            #expect(viaQuery == viaText && viaQuery == finder.mapping)
            #expect(target.send("w 9 10") == "ok")
            try finder.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageIndices == [9])
            #expect(target.send("unmap 0 1") == "ok")
            finder.useProcmapQuery = false
            let textAfter = try finder.currentMapping()
            finder.useProcmapQuery = true
            let queryAfter = try finder.currentMapping()
            #expect(textAfter == queryAfter && textAfter != viaText)
            #expect(queryAfter.start == viaQuery.start + 4096 && queryAfter.length == 255 * 4096 && queryAfter.fileOffset == 4096)
        }
    }

    /// Scattered writes over 256 MiB: without re-protecting in the scan, Linux 6.18 restarts the
    /// walk part way and reports pages twice; the finder must still deliver each page once.
    @Test(arguments: WriteTrackingReprotect.allCases)
    func scatteredWritesAreReportedOnceEach(reprotect: WriteTrackingReprotect) throws {
        guard let preload = WTEnv.require(WTEnv.preload), let exe = WTEnv.require(WTEnv.target) else { return }
        let pages = 65_536
        let (path, memory) = try WTEnv.ramFile(pages: pages)
        defer { unlink(path) }
        let target = try TargetProcess(executable: exe, ramFile: path, pages: pages, preload: preload)
        defer { target.stop() }
        #expect(target.send("w 0 \(pages)") == "ok")
        let finder = try WriteTrackingFinder(qemuPID: target.pid, ramFilePath: path, reprotect: reprotect)
        let buffer = CheckpointBuffer(limitPages: pages)
        try finder.collect(from: memory, full: true, into: buffer)
        for stride in [65, 6, 655] {
            for _ in 0..<3 {
                #expect(target.send("ws 0 \(pages) \(stride)") == "ok")
                buffer.reset()
                try finder.collect(from: memory, full: false, into: buffer)
                #expect(buffer.pageIndices == Array(Swift.stride(from: 0, to: pages, by: stride)), "stride \(stride): \(buffer.pageCount) pages")
            }
        }
        #expect(finder.stats.resyncs == 0)
        print("scattered writes, \(reprotect.rawValue): \(finder.stats.reorderedScans) scans returned repeated pages (merged)")
    }

    /// More written ranges than the finder's scan vector holds (4096): the finder loops.
    @Test func moreRangesThanTheScanVectorHolds() throws {
        guard let preload = WTEnv.require(WTEnv.preload), let exe = WTEnv.require(WTEnv.target) else { return }
        let pages = 12_000
        let (path, memory) = try WTEnv.ramFile(pages: pages)
        defer { unlink(path) }
        let target = try TargetProcess(executable: exe, ramFile: path, pages: pages, preload: preload)
        defer { target.stop() }
        let finder = try WriteTrackingFinder(qemuPID: target.pid, ramFilePath: path)
        let buffer = CheckpointBuffer(limitPages: pages)
        try finder.collect(from: memory, full: true, into: buffer)
        #expect(target.send("ws 1 \(pages) 2") == "ok")
        buffer.reset()
        try finder.collect(from: memory, full: false, into: buffer)
        #expect(buffer.pageIndices == Array(stride(from: 1, to: pages, by: 2)))
        #expect(finder.stats.lastRanges == 6000)
        // A buffer too small: a clear error, and the next collect is full (nothing lost).
        #expect(target.send("ws 0 \(pages) 3") == "ok")
        let small = CheckpointBuffer(limitPages: 100)
        do { try finder.collect(from: memory, full: false, into: small); Issue.record("overflow not reported") } catch {
            #expect(error.code == .resourceExhausted)
        }
        buffer.reset()
        try finder.collect(from: memory, full: false, into: buffer)
        #expect(finder.stats.lastWasFull && buffer.pageCount == pages)
    }

    /// Tools/uffd-preload/build.sh's default output is never where the agent looks (a build
    /// tree is its builder's to change: M7), and the library needs nothing but libc (QEMU must
    /// not load the Swift runtime).
    @Test func preloadLibraryIsNotTakenFromTheBuildTree() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [VMEnv.repoRoot + "/Tools/uffd-preload/build.sh"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let path = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        #expect(path == VMEnv.repoRoot + "/.build/geminus-uffd-preload/\(WriteTrackingPreload.fileName)")
        #expect(WriteTrackingPreload.searchDirectories() == [WriteTrackingPreload.installDirectory, "/usr/lib/geminus"])
        #expect(WriteTrackingPreload.locate(environment: [:]) != path)
        let bytes = try #require(FileManager.default.contents(atPath: path))
        #expect(bytes.range(of: Data("libswiftCore".utf8)) == nil)
        #expect(bytes.range(of: Data("libc.so.6".utf8)) != nil)
    }

    @Test func devicesThatDefeatTrackingAreFound() {
        let argv = ["qemu-system-x86_64", "-append", "vfio virtio-balloon", "-device", #"{"driver":"virtio-balloon-pci","id":"balloon0"}"#,
                    "-device", "virtio-mem-pci,memdev=m0", "-netdev", "vhost-user,id=n0,chardev=c0", "-device", "vfio-pci,host=0000:01:00.0",
                    "-device", "virtio-net-pci,netdev=n1", "-netdev", "tap,id=n1,vhost=on"]
        let found = WriteTrackingFinder.untrackableDevices(inArguments: argv)
        #expect(found.map(\.argument) == [argv[4], argv[6], argv[8], argv[10]], "the -append text and kernel vhost are not devices to refuse")
        #expect(WriteTrackingFinder.untrackableDevices(inArguments: QEMULauncher.arguments(for: QEMUGuestConfig(ramMiB: 64, kernelPath: "/k", append: "",
                ramFilePath: "/dev/shm/x", qmpSocketPath: "/tmp/q", serialLogPath: "/tmp/s"))).isEmpty)
    }

    @Test func targetWithoutThePreloadGivesAClearError() throws {
        guard let exe = WTEnv.require(WTEnv.target) else { return }
        let (path, _) = try WTEnv.ramFile(pages: 16)
        defer { unlink(path) }
        let target = try TargetProcess(executable: exe, ramFile: path, pages: 16, preload: nil)
        defer { target.stop() }
        do { _ = try WriteTrackingFinder(qemuPID: target.pid, ramFilePath: path); Issue.record("tracking set up without a userfaultfd") } catch {
            #expect(error.code == .hypervisor)
            #expect(error.message.contains("not started with the preload library"))
            #expect(error.fix?.contains("LD_PRELOAD") == true)
        }
    }

    /// Mapping changes: each must end in an error or a full copy, never in an epoch that
    /// silently covers less.
    @Test func partialUnmapIsAnErrorNotAnEmptyEpoch() throws {
        try withTarget(pages: 256) { target, finder, memory, buffer in
            #expect(target.send("w 10 20") == "ok")
            #expect(target.send("unmap 100 110") == "ok")
            for _ in 0..<2 {  // and it stays an error
                buffer.reset()
                do throws(GeminusError) { try finder.collect(from: memory, full: false, into: buffer); Issue.record("a hole in the mapping was not detected") } catch {
                    #expect(error.code == .hypervisor)
                    #expect(error.message.contains("2 separate regions"), "\(error)")
                }
            }
        }
    }

    @Test func anonymousMappingOverPartIsAnError() throws {
        try withTarget(pages: 256) { target, finder, memory, buffer in
            #expect(target.send("fixanon 0 1") == "ok")
            do throws(GeminusError) { try finder.collect(from: memory, full: false, into: buffer); Issue.record("a foreign mapping over guest RAM was not detected") } catch {
                #expect(error.code == .hypervisor)
            }
        }
    }

    @Test func sameFileMappedAgainOverPartGivesAFullCopy() throws {
        try withTarget(pages: 256) { target, finder, memory, buffer in
            // Same file, same offsets: /proc/PID/maps looks the same, but the new VMA is not
            // registered; the scan's CHECK_WPASYNC fails it, the finder re-registers and copies all.
            #expect(target.send("fixfile 50 60") == "ok")
            #expect(target.send("w 55 57") == "ok")
            try finder.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageCount == 256 && finder.stats.lastWasFull)
            #expect(finder.stats.resyncs == 1)
            #expect(finder.stats.lastResyncReason?.contains("PAGEMAP_SCAN") == true, "\(finder.stats.lastResyncReason ?? "")")
            // Tracked again, the re-mapped part included.
            #expect(target.send("w 52 58") == "ok")
            buffer.reset()
            try finder.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageIndices == Array(52..<58))
        }
    }

    @Test func movedMappingGivesAFullCopyAndIsTrackedThere() throws {
        try withTarget(pages: 256) { target, finder, memory, buffer in
            let before = finder.mapping
            #expect(target.send("move") == "ok")
            #expect(target.send("w 3 4") == "ok")
            try finder.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageCount == 256 && finder.stats.lastWasFull && finder.stats.resyncs == 1)
            #expect(finder.mapping != before && finder.mapping.length == before.length)
            #expect(target.send("w 7 9") == "ok")
            buffer.reset()
            try finder.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageIndices == [7, 8])
        }
    }

    @Test func fullUnmapIsAnError() throws {
        try withTarget(pages: 64) { target, finder, memory, buffer in
            #expect(target.send("unmap 0 64") == "ok")
            do throws(GeminusError) { try finder.collect(from: memory, full: false, into: buffer); Issue.record("a vanished mapping was not detected") } catch {
                #expect(error.message.contains("has no mapping of the RAM file"))
            }
        }
    }

    /// Agent restart: a new finder takes the descriptor again, while the first one's
    /// registration is still in place (it crashed: nothing was undone), and resyncs.
    @Test func aSecondAgentTakesTheDescriptorAgain() throws {
        try withTarget(pages: 128) { target, finder, memory, buffer in
            #expect(target.send("w 1 2") == "ok")
            try finder.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageIndices == [1])
            let second = try WriteTrackingFinder(qemuPID: target.pid, ramFilePath: finder.ramFilePath)
            buffer.reset()
            try second.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageCount == 128 && second.stats.lastWasFull)
            #expect(target.send("w 5 7") == "ok")
            buffer.reset()
            try second.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageIndices == [5, 6])
        }
    }

    /// A write the tracked mapping does not see (here through this process's own mapping of
    /// the file, as a vhost-user backend would write): the verifier reports it as a miss.
    @Test func verifierReportsAWriteTrackingCannotSee() throws {
        try withTarget(pages: 128) { target, finder, memory, buffer in
            let verifier = VerifyingFinder(tracking: finder)
            buffer.reset()
            try verifier.collect(from: memory, full: true, into: buffer)
            #expect(target.send("w 3 5") == "ok")
            buffer.reset()
            try verifier.collect(from: memory, full: false, into: buffer)
            #expect(verifier.verification.epochs == 1 && verifier.verification.missedPages == 0)
            #expect(target.send("w 10 11") == "ok")
            memory.storeU64(0xDEAD, at: 77 * 4096)
            buffer.reset()
            do throws(GeminusError) { try verifier.collect(from: memory, full: false, into: buffer); Issue.record("a missed write was not reported") } catch {
                #expect(error.code == .internalInvariant)
                #expect(error.message.contains("missed 1 of 2 changed pages"), "\(error)")
            }
            #expect(verifier.verification.missedPages == 1 && verifier.verification.lastMissed == [77])
            #expect(buffer.pageIndices == [10, 77], "the missed page is still delivered")
            buffer.reset()
            try verifier.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageCount == 128, "after a miss the next epoch is full")
        }
    }

    /// The known blind spot (notes/write-tracking.md): a discard (what a balloon or virtio-mem
    /// makes QEMU do) zeroes pages without reporting them. The finder cannot see it, which is
    /// why such devices are refused at setup; the verifier does see it.
    @Test func discardIsInvisibleToTrackingButTheVerifierReportsIt() throws {
        try withTarget(pages: 64) { target, finder, memory, buffer in
            let verifier = VerifyingFinder(tracking: finder)
            try verifier.collect(from: memory, full: true, into: buffer)
            #expect(target.send("w 5 6") == "ok")
            buffer.reset()
            try verifier.collect(from: memory, full: false, into: buffer)
            #expect(buffer.pageIndices == [5])
            #expect(target.send("punch 5 6") == "ok")
            #expect(memory.loadU64(at: 5 * 4096) == 0, "the discarded page reads as zero")
            buffer.reset()
            do throws(GeminusError) { try verifier.collect(from: memory, full: false, into: buffer); Issue.record("the discard was expected to be missed by tracking and caught by the verifier") } catch {
                #expect(error.code == .internalInvariant)
            }
            #expect(verifier.verification.lastMissed == [5])
        }
    }

    private func withTarget(pages: Int, _ body: (TargetProcess, WriteTrackingFinder, PageMemory, CheckpointBuffer) throws -> Void) throws {
        guard let preload = WTEnv.require(WTEnv.preload), let exe = WTEnv.require(WTEnv.target) else { return }
        let (path, memory) = try WTEnv.ramFile(pages: pages)
        defer { unlink(path) }
        let target = try TargetProcess(executable: exe, ramFile: path, pages: pages, preload: preload)
        defer { target.stop() }
        let finder = try WriteTrackingFinder(qemuPID: target.pid, ramFilePath: path)
        let buffer = CheckpointBuffer(limitPages: pages)
        try finder.collect(from: memory, full: true, into: buffer)
        buffer.reset()
        try body(target, finder, memory, buffer)
    }
}

/// Write tracking on the real tiny guest under QEMU, checked against a full comparison.
@Suite(.serialized, .enabled(if: VMEnv.enabled, VMEnv.skipReason))
struct WriteTrackingQEMUTests {
    @Test(arguments: WriteTrackingReprotect.allCases)
    func hundredCheckpointsWithoutAMiss(reprotect: WriteTrackingReprotect) throws {
        guard let kernel = VMEnv.requireGuest(), let preload = WTEnv.require(WTEnv.preload) else { return }
        // The window moves a page every 16 iterations: hundreds of distinct pages per epoch.
        let config = VMEnv.config(kernel: kernel, role: "wt", append: "pages=128 walk=16")
        var fallbacks: [GeminusError] = []
        let (guest, finder) = try QEMUGuest.launch(config, counterAddress: QEMUGuest.tinyGuestCounterAddress,
                                                  dirtyPages: DirtyPagePolicy(method: .auto, verify: true, reprotect: reprotect), preload: .library(preload)) { fallbacks.append($0) }
        defer { guest.shutdown() }
        #expect(fallbacks.isEmpty, "\(fallbacks)")
        let verifier = try #require(finder as? VerifyingFinder)
        let tracker = try #require(verifier.tracking as? WriteTrackingFinder)
        try VMEnv.waitBooted(guest.memory)
        let buffer = CheckpointBuffer(limitPages: guest.pageCount)
        var pauses: [UInt64] = [], finds: [UInt64] = [], scans: [UInt64] = [], checks: [UInt64] = []
        let c0 = guest.progressCounter
        for epoch in 0..<110 {
            VMEnv.sleep(ms: 5 + epoch % 4 * 5)
            try guest.pause()
            try guest.capture(full: epoch == 0, into: buffer)
            try guest.resume()
            if epoch > 0 {
                #expect(!tracker.stats.lastWasFull, "epoch \(epoch): \(tracker.stats.lastResyncReason ?? "")")
                #expect(buffer.pageIndices.contains(0x200000 / GuestPage.size), "epoch \(epoch): the status page is written every loop")
                if let t = guest.lastTimings { pauses.append(t.pauseNanos); finds.append(t.findCopyNanos) }
                scans.append(tracker.stats.lastScanNanos)
                checks.append(tracker.stats.lastMappingCheckNanos)
            }
        }
        let v = verifier.verification
        #expect(v.epochs >= 100)
        #expect(v.missedPages == 0)
        #expect(v.duplicatePages == 0)
        #expect(v.reportedPages >= 100 * v.epochs, "the guest wrote a non-trivial set: \(v.reportedPages) pages in \(v.epochs) epochs")
        #expect(v.changedPages > 0 && v.changedPages <= v.reportedPages)
        #expect(tracker.stats.resyncs == 0)
        #expect(guest.progressCounter > c0)
        print("write tracking (\(reprotect.rawValue)) on the tiny guest, \(config.ramMiB) MiB, \(v.epochs) verified epochs: \(v.reportedPages / v.epochs) pages/epoch, 0 missed; median pause \(VMEnv.median(pauses)) ms, find+copy (with the verifying compare) \(VMEnv.median(finds)) ms, scan \(VMEnv.median(scans)) ms, maps check \(VMEnv.median(checks)) ms")
    }

    @Test func qemuWithoutThePreloadGivesAClearErrorAndFallsBack() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        let guest = try QEMUGuest.launch(VMEnv.config(kernel: kernel, role: "wt-nopre"), counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        do { _ = try WriteTrackingFinder(qemuPID: guest.process.pid, ramFilePath: guest.process.config.ramFilePath); Issue.record("tracking without the preload") } catch {
            #expect(error.code == .hypervisor)
            #expect(error.message.contains("QEMU (pid \(guest.process.pid)) has no userfaultfd: QEMU was not started with the preload library"))
        }
        // Tracking with a library that cannot load: QEMU runs, capture uses the compare method.
        var fallbacks: [GeminusError] = []
        let (g2, finder) = try QEMUGuest.launch(VMEnv.config(kernel: kernel, role: "wt-bad"), counterAddress: QEMUGuest.tinyGuestCounterAddress,
                                                   dirtyPages: DirtyPagePolicy(method: .auto), preload: .library("/nonexistent/\(WriteTrackingPreload.fileName)")) { fallbacks.append($0) }
        defer { g2.shutdown() }
        #expect(finder is ShadowCompareFinder)
        #expect(fallbacks.count == 1 && fallbacks.first?.message.contains("not started with the preload library") == true)
        try VMEnv.waitBooted(g2.memory)
        let buffer = CheckpointBuffer(limitPages: g2.pageCount)
        try g2.pause()
        try g2.capture(full: true, into: buffer)
        try g2.resume()
        #expect(buffer.pageCount == g2.pageCount)
    }
}

/// Measurements for docs/BENCHMARKS.md, "Write tracking vs compare". Off unless
/// GEMINUS_WT_BENCH=1 (minutes, and up to 3x the largest size in memory); prints table rows.
///   GEMINUS_WT_BENCH=1 swift test --skip-build --filter WriteTrackingBenchmarks
/// GEMINUS_WT_BENCH_MIB (default 256,1024,4096) sets the plain-process sizes,
/// GEMINUS_WT_BENCH_QEMU_MIB (default 64,256) the QEMU guest sizes.
@Suite(.serialized, .enabled(if: ProcessInfo.processInfo.environment["GEMINUS_WT_BENCH"] == "1", "set GEMINUS_WT_BENCH=1 to measure"))
struct WriteTrackingBenchmarks {
    static func sizes(_ name: String, _ fallback: [Int]) -> [Int] {
        ProcessInfo.processInfo.environment[name].map { $0.split(separator: ",").compactMap { Int($0) } } ?? fallback
    }

    static func memAvailableMiB() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("MemAvailable:") }),
              let kib = Int(line.split(separator: " ")[1]) else { return 0 }
        return kib >> 10
    }

    static func ms(_ xs: [UInt64]) -> String { String(format: "%.3f", VMEnv.median(xs)) }

    /// A process with the same kind of mapping as QEMU (shared tmpfs RAM file, every page
    /// populated), sizes a TCG guest cannot reach here: scan and copy per epoch against RAM size
    /// and pages written, the compare method on the same memory, and the write-fault cost.
    @Test func plainProcessTrackingVersusCompare() throws {
        guard let preload = WTEnv.require(WTEnv.preload), let exe = WTEnv.require(WTEnv.target) else { return }
        print("| RAM | written pages | mode | scan | maps check | re-protect + copy | collect total | compare: collect | write after re-protect (per page) | rewrite, no fault (per page) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for mib in Self.sizes("GEMINUS_WT_BENCH_MIB", [256, 1024, 4096]) {
            let pages = mib * 256
            let (path, memory) = try WTEnv.ramFile(pages: pages)
            defer { unlink(path) }
            let target = try TargetProcess(executable: exe, ramFile: path, pages: pages, preload: preload)
            defer { target.stop() }
            #expect(target.send("w 0 \(pages)") == "ok")  // populate: a guest that has touched all its RAM
            let written = [0, 100, 1000, 10_000]
            let small = CheckpointBuffer(limitPages: 20_000, initialCapacityPages: 20_000)
            var rows: [String] = []
            var compare: [[UInt64]] = Array(repeating: [], count: written.count)
            do {
                let big = CheckpointBuffer(limitPages: pages, initialCapacityPages: pages)
                for mode in WriteTrackingReprotect.allCases {
                    // One finder at a time: the previous one's deinit unprotects and unregisters.
                    let finder = try WriteTrackingFinder(qemuPID: target.pid, ramFilePath: path, reprotect: mode)
                    big.reset()
                    try finder.collect(from: memory, full: true, into: big)
                    rows.append("| \(mib) MiB | full copy | \(mode.rawValue) | protect all: \(String(format: "%.1f", Double(finder.stats.lastProtectAllNanos) / 1e6)) ms | | pread all: \(String(format: "%.0f", Double(finder.stats.lastFullCopyNanos) / 1e6)) ms\(mode == .inScan ? " (fresh buffer)" : " (buffer reused)") | | | | |")
                    for w in written {
                        var scan: [UInt64] = [], check: [UInt64] = [], copy: [UInt64] = [], total: [UInt64] = [], fault: [UInt64] = [], plain: [UInt64] = []
                        let stride = w == 0 ? 0 : pages / w
                        var count = 0
                        for _ in 0..<9 {
                            if w > 0 {
                                #expect(target.send("ws 0 \(pages) \(stride)") == "ok")
                                fault.append(UInt64(target.send("t").dropFirst(3)) ?? 0)
                                #expect(target.send("ws 0 \(pages) \(stride)") == "ok")
                                plain.append(UInt64(target.send("t").dropFirst(3)) ?? 0)
                            }
                            small.reset()
                            let t0 = Monotonic.nanos()
                            try finder.collect(from: memory, full: false, into: small)
                            total.append(Monotonic.nanos() - t0)
                            scan.append(finder.stats.lastScanNanos)
                            check.append(finder.stats.lastMappingCheckNanos)
                            copy.append(finder.stats.lastCopyNanos)
                            count = small.pageCount
                            #expect(!finder.stats.lastWasFull)
                        }
                        let perFault = count == 0 ? "" : String(format: "%.2f µs", VMEnv.median(fault) * 1e3 / Double(count))
                        let perPlain = count == 0 ? "" : String(format: "%.3f µs", VMEnv.median(plain) * 1e3 / Double(count))
                        rows.append("| \(mib) MiB | \(count) | \(mode.rawValue) | \(Self.ms(scan)) ms | \(Self.ms(check)) ms | \(Self.ms(copy)) ms | \(Self.ms(total)) ms | COMPARE\(written.firstIndex(of: w)!) | \(perFault) | \(perPlain) |")
                    }
                }
            }
            // The compare method on the same memory: shadow + full first copy = 2x RAM more.
            if Self.memAvailableMiB() > 2 * mib + 2048 {
                let cmp = ShadowCompareFinder()
                do {
                    let big = CheckpointBuffer(limitPages: pages, initialCapacityPages: pages)
                    try cmp.collect(from: memory, full: true, into: big)
                }
                for (i, w) in written.enumerated() {
                    let stride = w == 0 ? 0 : pages / w
                    for _ in 0..<5 {
                        if w > 0 { #expect(target.send("ws 0 \(pages) \(stride)") == "ok") }
                        small.reset()
                        let t0 = Monotonic.nanos()
                        try cmp.collect(from: memory, full: false, into: small)
                        compare[i].append(Monotonic.nanos() - t0)
                    }
                }
            }
            for var r in rows {
                for i in written.indices {
                    r = r.replacingOccurrences(of: "COMPARE\(i)", with: compare[i].isEmpty ? "not run (memory)" : Self.ms(compare[i]) + " ms")
                }
                print(r)
            }
        }
    }

    /// The tiny guest under QEMU TCG, same workload, each method in its own QEMU: pause per
    /// checkpoint and the guest's speed while running (the write-protect faults' cost).
    @Test func qemuGuestTrackingVersusCompare() throws {
        guard let kernel = VMEnv.requireGuest(), let preload = WTEnv.require(WTEnv.preload) else { return }
        print("| guest RAM | workload | method | pages/epoch | pause | find + copy | guest iterations/s while running |")
        print("|---|---|---|---|---|---|---|")
        for mib in Self.sizes("GEMINUS_WT_BENCH_QEMU_MIB", [64, 256]) {
            for append in ["pages=64", "pages=1000 walk=4"] {
                var rates: [String: Double] = [:]
                for method in ["compare", "tracking"] {
                    let config = VMEnv.config(kernel: kernel, role: "wtb", ramMiB: mib, append: append)
                    let guest: QEMUGuest
                    if method == "tracking" {
                        var fallbacks: [GeminusError] = []
                        guest = try QEMUGuest.launch(config, counterAddress: QEMUGuest.tinyGuestCounterAddress, dirtyPages: DirtyPagePolicy(method: .auto), preload: .library(preload)) { fallbacks.append($0) }.guest
                        #expect(fallbacks.isEmpty, "\(fallbacks)")
                    } else {
                        guest = try QEMUGuest.launch(config, counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
                    }
                    defer { guest.shutdown() }
                    try VMEnv.waitBooted(guest.memory)
                    let buffer = CheckpointBuffer(limitPages: guest.pageCount)
                    var pause: [UInt64] = [], find: [UInt64] = [], pages: [UInt64] = []
                    var iterRates: [Double] = []
                    var lastResume = (Monotonic.nanos(), guest.memory.loadU64(at: 0x200018))
                    for epoch in 0..<61 {
                        VMEnv.sleep(ms: 25)
                        try guest.pause()
                        let now = (Monotonic.nanos(), guest.memory.loadU64(at: 0x200018))
                        if epoch > 0 { iterRates.append(Double(now.1 - lastResume.1) / (Double(now.0 - lastResume.0) / 1e9)) }
                        try guest.capture(full: epoch == 0, into: buffer)
                        try guest.resume()
                        lastResume = (Monotonic.nanos(), guest.memory.loadU64(at: 0x200018))
                        if epoch > 0, let t = guest.lastTimings {
                            pause.append(t.pauseNanos)
                            find.append(t.findCopyNanos)
                            pages.append(UInt64(t.pages))
                        }
                    }
                    iterRates.sort()
                    let rate = iterRates[iterRates.count / 2]
                    rates[method] = rate
                    print("| \(mib) MiB | `\(append)` | \(method) | \(pages.sorted()[pages.count / 2]) | \(Self.ms(pause)) ms | \(Self.ms(find)) ms | \(String(format: "%.0f", rate)) |")
                }
                if let c = rates["compare"], let t = rates["tracking"] {
                    print("|  |  | tracking / compare speed | | | | \(String(format: "%.0f%%", 100 * t / c)) |")
                }
            }
        }
    }
}
