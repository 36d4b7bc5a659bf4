import Foundation
import GeminusCore
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// QEMU COLO (`x-colo`) between two local QEMUs, set up as notes/colo.md found it runs (RAM
/// backend, unix socket, `x-checkpoint-delay`), measured from QEMU's `colo_vm_state_change`
/// trace lines: the primary's pause is from `'run' => 'stop'` to `'stop' => 'run'`. QEMU 7.2
/// under TCG deadlocks at the first checkpoint; this says so from what it saw rather than
/// assuming it, so a QEMU that works gets measured.
public struct ColoAttempt: Sendable {
    public enum Outcome: Sendable {
        case measured(pausesMicros: [UInt64])
        case failed(String)
    }

    public var kernelPath: String
    public var ramMiB: Int
    public var checkpointDelayMillis: Int
    public var watchSeconds: Double
    public var guestOptions: String

    public init(kernelPath: String, ramMiB: Int, checkpointDelayMillis: Int = 100, watchSeconds: Double = 8, guestOptions: String = "") {
        self.kernelPath = kernelPath
        self.guestOptions = guestOptions
        self.ramMiB = ramMiB
        self.checkpointDelayMillis = checkpointDelayMillis
        self.watchSeconds = watchSeconds
    }

    public func run(pagesPerLoop: Int) -> Outcome {
        let dir = NSTemporaryDirectory() + "/geminus-colo-\(getpid())-\(pagesPerLoop)"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binary = QEMULauncher.locate("qemu-system-x86_64") ?? "/usr/bin/qemu-system-x86_64"
        func argv(_ role: String) -> [String] {
            ["-accel", "tcg", "-machine", "pc-i440fx-7.2,memory-backend=pc.ram", "-m", "\(ramMiB)",
             "-object", "memory-backend-ram,id=pc.ram,size=\(ramMiB)M", "-smp", "1", "-cpu", "qemu64",
             "-nodefaults", "-no-user-config", "-display", "none", "-kernel", kernelPath, "-append", "pages=\(pagesPerLoop) \(guestOptions)",
             "-msg", "timestamp=on", "-trace", "colo_vm_state_change",
             "-qmp", "unix:\(dir)/\(role).qmp,server=on,wait=off"] + (role == "secondary" ? ["-incoming", "defer"] : [])
        }
        var processes: [Process] = []
        defer {
            for p in processes where p.isRunning { kill(p.processIdentifier, SIGKILL) }
            for p in processes { p.waitUntilExit() }
        }
        func start(_ role: String) throws -> Process {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: binary)
            p.arguments = argv(role)
            FileManager.default.createFile(atPath: "\(dir)/\(role).err", contents: nil)
            p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(dir)/\(role).err"))
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            processes.append(p)
            return p
        }
        do {
            _ = try start("secondary")
            _ = try start("primary")
            let secondary = try QMPClient(socketPath: "\(dir)/secondary.qmp", connectTimeout: 10)
            let primary = try QMPClient(socketPath: "\(dir)/primary.qmp", connectTimeout: 10)
            defer { secondary.close(); primary.close() }
            let colo: [String: Any] = ["capabilities": [["capability": "x-colo", "state": true]]]
            try secondary.execute("migrate-set-capabilities", arguments: colo)
            try secondary.execute("migrate-incoming", arguments: ["uri": "unix:\(dir)/colo.mig"])
            try primary.execute("migrate-set-capabilities", arguments: colo)
            try primary.execute("migrate-set-parameters", arguments: ["x-checkpoint-delay": checkpointDelayMillis,
                                                                     "max-bandwidth": 10 << 30, "downtime-limit": 2000])
            try primary.execute("migrate", arguments: ["uri": "unix:\(dir)/colo.mig"])
            let deadline = Monotonic.nanos() + UInt64(watchSeconds * 1e9)
            var lastStatus = "unknown"
            var answering = true
            while Monotonic.nanos() < deadline {
                Monotonic.sleep(nanos: 250_000_000)
                if answering {
                    if let info = try? primary.execute("query-migrate", timeout: 1) as? [String: Any] {
                        lastStatus = info["status"] as? String ?? lastStatus
                    } else {
                        answering = false
                    }
                }
            }
            let trace = (try? String(contentsOfFile: "\(dir)/primary.err", encoding: .utf8)) ?? ""
            let changes = Self.stateChanges(trace)
            let pauses = Self.pauses(changes)
            if pauses.count >= 2 { return .measured(pausesMicros: Array(pauses.dropFirst())) }
            let stuck = changes.last.map { $0.to == "stop" } ?? false
            return .failed("after `migrate` the primary \(lastStatus == "unknown" ? "never answered query-migrate" : "reached migration status '\(lastStatus)'")"
                + (stuck ? " and entered a checkpoint ('run' => 'stop') that it never left in \(Int(watchSeconds)) s" : ", \(pauses.count) checkpoint(s) completed in \(Int(watchSeconds)) s")
                + (answering ? "" : "; its QMP monitor stopped answering (the main loop is blocked)")
                + ": the deadlock of QEMU 7.2's COLO under TCG described in notes/colo.md (its workaround is a QEMU-internal LD_PRELOAD shim, not built here)")
        } catch {
            return .failed("could not set COLO up: \(error)")
        }
    }

    /// `PID@SECONDS.MICROS:colo_vm_state_change Change 'A' => 'B'` lines, in order.
    static func stateChanges(_ trace: String) -> [(micros: UInt64, to: String)] {
        trace.split(separator: "\n").compactMap { line in
            guard line.contains("colo_vm_state_change"), let at = line.firstIndex(of: "@"),
                  let colon = line[at...].firstIndex(of: ":"), let seconds = Double(line[line.index(after: at)..<colon]),
                  let arrow = line.range(of: "=> '") else { return nil }
            let to = line[arrow.upperBound...].prefix { $0 != "'" }
            return (UInt64(seconds * 1e6), String(to))
        }
    }

    /// Each 'run' => 'stop' followed by 'stop' => 'run': the primary's pause.
    static func pauses(_ changes: [(micros: UInt64, to: String)]) -> [UInt64] {
        var out: [UInt64] = []
        var stoppedAt: UInt64?
        for c in changes {
            if c.to == "stop" { stoppedAt = c.micros }
            if c.to == "run", let s = stoppedAt { out.append(c.micros - s); stoppedAt = nil }
        }
        return out
    }
}
