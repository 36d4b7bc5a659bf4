import Foundation
import GeminusCore
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// QEMU's own live migration of the same guest to a second local QEMU over a unix socket: the
/// stop-and-copy downtime QEMU reports (`query-migrate` → `downtime`, ms). The nearest stock
/// mechanism to one checkpoint: what a single switchover costs with QEMU alone.
public struct MigrationDowntimeBench: Sendable {
    public struct Result: Sendable {
        public var pagesPerLoop: Int
        /// QEMU's reported downtime of each migration, ms.
        public var downtimeMillis: [UInt64] = []
        public var totalMillis: [UInt64] = []
        public var failures: [String] = []
    }

    public var kernelPath: String
    public var ramMiB: Int
    public var runs: Int
    public var guestOptions: String

    public init(kernelPath: String, ramMiB: Int, runs: Int, guestOptions: String = "") {
        self.kernelPath = kernelPath
        self.guestOptions = guestOptions
        self.ramMiB = ramMiB
        self.runs = runs
    }

    public func run(pagesPerLoop: Int) -> Result {
        var r = Result(pagesPerLoop: pagesPerLoop)
        for n in 0..<runs {
            do throws(GeminusError) {
                let (down, total) = try migrateOnce(pagesPerLoop: pagesPerLoop, attempt: n)
                r.downtimeMillis.append(down)
                r.totalMillis.append(total)
            } catch {
                r.failures.append(error.message)
            }
        }
        return r
    }

    func migrateOnce(pagesPerLoop: Int, attempt: Int) throws(GeminusError) -> (UInt64, UInt64) {
        let tag = "geminus-bench-mig-\(getpid())-\(pagesPerLoop)-\(attempt)"
        let source = QEMUGuestConfig.standard(tag: tag + "-src", ramMiB: ramMiB, kernelPath: kernelPath, append: "pages=\(pagesPerLoop) \(guestOptions)")
        var target = QEMUGuestConfig.standard(tag: tag + "-dst", ramMiB: ramMiB, kernelPath: kernelPath, append: "pages=\(pagesPerLoop) \(guestOptions)")
        // A plain migration target: the same machine, RAM copied over the stream.
        target.extraArguments = ["-incoming", "defer"]
        let socket = NSTemporaryDirectory() + "/\(tag).mig"
        unlink(socket)
        defer { unlink(socket) }
        let guest = try QEMUGuest.launch(source, counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        unlink(target.ramFilePath)
        let destination = try QEMULauncher.start(target)
        defer { destination.cleanup(removeRAMFile: true) }
        let dq = try QMPClient(socketPath: target.qmpSocketPath, connectTimeout: 10)
        defer { dq.close() }
        try GuestCheckpointBench.waitForBoot(guest)
        try dq.execute("migrate-incoming", arguments: ["uri": "unix:\(socket)"])
        // As notes/colo.md found: with the defaults (32 MiB/s) a busy guest never converges.
        try guest.qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": 10 << 30, "downtime-limit": 300])
        try guest.qmp.execute("migrate", arguments: ["uri": "unix:\(socket)"])
        let deadline = Monotonic.nanos() + 60_000_000_000
        while true {
            let info = try guest.qmp.execute("query-migrate") as? [String: Any] ?? [:]
            switch info["status"] as? String ?? "" {
            case "completed":
                let down = (info["downtime"] as? NSNumber)?.uint64Value ?? 0
                let total = (info["total-time"] as? NSNumber)?.uint64Value ?? 0
                return (down, total)
            case "failed", "cancelled":
                throw GeminusError(.hypervisor, "migration failed: \(info["error-desc"] as? String ?? "no reason given")")
            default:
                guard Monotonic.nanos() < deadline else { throw GeminusError(.timeout, "migration did not complete within 60 s") }
                Monotonic.sleep(nanos: 2_000_000)
            }
        }
    }
}
