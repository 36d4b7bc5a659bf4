import Foundation
import Testing
import GeminusCore
import GeminusHypervisor
@testable import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// Gate for tests that run real QEMU. Missing QEMU fails them (naming the package), unless
/// GEMINUS_SKIP_VM_TESTS=1, which skips them with the reason recorded.
enum VMEnv {
    static let skipRequested = ProcessInfo.processInfo.environment["GEMINUS_SKIP_VM_TESTS"] == "1"
    static let qemuPath = QEMULauncher.locate("qemu-system-x86_64")
    /// False only when QEMU is missing and skipping was asked for.
    static let enabled = qemuPath != nil || !skipRequested
    static let skipReason: Comment = "qemu-system-x86_64 is not installed and GEMINUS_SKIP_VM_TESTS=1: real-VM test skipped (install with: \(QEMULauncher.installHint))"

    static let repoRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    /// Builds Tools/guest-tiny once per test process into a temporary directory.
    static let guestELF: Result<String, GeminusError> = {
        let out = guestBuildDirectory()
        // Removed when the test process exits.
        atexit { _ = try? FileManager.default.removeItem(atPath: VMEnv.guestBuildDirectory()) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [repoRoot + "/Tools/guest-tiny/build.sh", out]
        let stdout = Pipe(), stderr = Pipe()
        p.standardOutput = stdout
        p.standardError = stderr
        do { try p.run() } catch { return .failure(GeminusError(.io, "cannot run build.sh: \(error)")) }
        let outData = stdout.fileHandleForReading.readDataToEndOfFile()
        let errData = stderr.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let path = String(decoding: outData, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard p.terminationStatus == 0, FileManager.default.fileExists(atPath: path) else {
            return .failure(GeminusError(.io, "Tools/guest-tiny/build.sh failed: \(String(decoding: errData, as: UTF8.self))"))
        }
        return .success(path)
    }()

    static func guestBuildDirectory() -> String { NSTemporaryDirectory() + "geminus-qemu-tests-\(getpid())-guest" }

    /// The tiny guest's kernel, or nil after recording why the test cannot run.
    static func requireGuest(sourceLocation: SourceLocation = #_sourceLocation) -> String? {
        guard qemuPath != nil else {
            Issue.record("qemu-system-x86_64 not found: install the Debian package qemu-system-x86 (\(QEMULauncher.installHint)), or set GEMINUS_SKIP_VM_TESTS=1 to skip the real-VM tests",
                         sourceLocation: sourceLocation)
            return nil
        }
        switch guestELF {
        case .success(let path): return path
        case .failure(let e):
            Issue.record("cannot build the tiny guest: \(e)", sourceLocation: sourceLocation)
            return nil
        }
    }

    nonisolated(unsafe) private static var serial = 0
    private static let serialLock = NSLock()

    /// A configuration with unique file names for one QEMU of this test process.
    /// Guest RAM for the tests: 64 MiB, or GEMINUS_QEMU_TEST_RAM_MIB (for measurements).
    static let ramMiB = ProcessInfo.processInfo.environment["GEMINUS_QEMU_TEST_RAM_MIB"].flatMap { Int($0) } ?? 64

    static func config(kernel: String, role: String, ramMiB: Int = VMEnv.ramMiB, append: String = "pages=64") -> QEMUGuestConfig {
        serialLock.lock()
        serial += 1
        let n = serial
        serialLock.unlock()
        return QEMUGuestConfig.standard(tag: "gq-\(getpid())-\(n)-\(role)", ramMiB: ramMiB, kernelPath: kernel, append: append)
    }

    static let statusMagic: UInt64 = 0x47454D494E555331
    static let bootMarkerAddress = 0x200020

    /// Waits until the guest has published a valid status page and its counter is non-zero.
    static func waitBooted(_ memory: PageMemory, timeout: Double = 10) throws {
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        while memory.loadU64(at: 0x200000) != statusMagic || memory.loadU64(at: 0x200008) == 0 {
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.timeout, "the tiny guest did not boot within \(timeout) s")
            }
            Monotonic.sleep(nanos: 5_000_000)
        }
    }

    static func sleep(ms: Int) { Monotonic.sleep(nanos: UInt64(ms) * 1_000_000) }

    static func median(_ xs: [UInt64]) -> Double {
        guard !xs.isEmpty else { return 0 }
        return Double(xs.sorted()[xs.count / 2]) / 1e6
    }

    /// Lists leftover files of this test process in /dev/shm and in its run directory, where
    /// the guests' files live (a test fails if it leaves some).
    static func leftoverShmFiles() -> [String] {
        let prefix = "gq-\(getpid())-"
        return ["/dev/shm", RunDirectory.agent].flatMap { dir in
            ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasPrefix(prefix) }
        }
    }
}

/// A throwaway output port (the tiny guest has no network).
struct NullOutput: GuestOutputPort {
    func offer(_ packet: [UInt8]) -> Bool { true }
}

/// A fake QMP server on a unix socket that greets, accepts qmp_capabilities, then runs `script`
/// for each later command line; for timeout/EOF tests without QEMU.
final class FakeQMPServer: @unchecked Sendable {
    let path: String
    private let listenFD: Int32
    private var thread: Thread?

    init(path: String, script: @escaping @Sendable (_ fd: Int32, _ line: String) -> Bool) throws {
        self.path = path
        unlink(path)
        listenFD = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            let b = Array(path.utf8)
            raw.copyBytes(from: b)
            raw[b.count] = 0
        }
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listenFD, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
        guard ok, listen(listenFD, 1) == 0 else { throw GeminusError(.io, "fake QMP server: bind/listen failed") }
        let lfd = listenFD
        let t = Thread {
            let c = accept(lfd, nil, nil)
            guard c >= 0 else { return }
            defer { close(c) }
            FakeQMPServer.write(c, #"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}"#)
            var pending = [UInt8]()
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buf.withUnsafeMutableBytes { recv(c, $0.baseAddress, $0.count, 0) }
                if n <= 0 { return }
                pending += buf[..<n]
                while let nl = pending.firstIndex(of: 0x0A) {
                    let line = String(decoding: pending[..<nl], as: UTF8.self)
                    pending.removeSubrange(...nl)
                    if line.contains("qmp_capabilities") {
                        FakeQMPServer.write(c, #"{"return": {}, "id": 1}"#)
                    } else if !script(c, line) {
                        return
                    }
                }
            }
        }
        thread = t
        t.start()
    }

    static func write(_ fd: Int32, _ s: String) {
        let b = Array((s + "\n").utf8)
        _ = b.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    func stop() {
        shutdown(listenFD, Int32(SHUT_RDWR))
        close(listenFD)
        unlink(path)
    }
}
