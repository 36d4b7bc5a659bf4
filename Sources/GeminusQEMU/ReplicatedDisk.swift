import CGeminusSupport
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// A CA guest's disk: a raw file QEMU opens, and where its writes are replicated from. The
/// primary QEMU mirrors every write synchronously (`blockdev-mirror`, `copy-mode=write-blocking`,
/// `sync=none`) to `NBDExport`, served by the agent itself; each checkpoint carries the writes
/// made in its epoch, and the secondary applies them to its replica file only when that epoch
/// commits (`Replica`). A full checkpoint carries the whole disk instead (its non-zero 64 KiB
/// stretches), read while the guest is paused; the mirror starts right after the first one.
///
/// Supported: a raw file of at most `maxSizeBytes`, on a guest the agent starts (`--guest qemu
/// --disk-mib N`). Refused with the reason: larger disks (a full checkpoint carries the whole
/// disk and the secondary stages it in memory), and libvirt domains' disks (not built).
public struct DiskSetup: Sendable, Equatable {
    public static let maxSizeBytes = UInt64(Replica.maxDiskBytesPerEpoch)
    public var path: String
    public var sizeBytes: UInt64
    /// Where the agent's NBD export listens for the mirror (primary).
    public var exportSocketPath: String

    /// `sizeBytes` is a multiple of 4 KiB (the wire format carries it in 4 KiB units).
    public init(path: String, sizeBytes: UInt64, exportSocketPath: String) {
        precondition(sizeBytes > 0 && sizeBytes % EpochBegin.diskUnitBytes == 0, "disk sizes are whole 4 KiB units")
        self.path = path
        self.sizeBytes = sizeBytes
        self.exportSocketPath = exportSocketPath
    }

    static let nodeName = "geminus-disk"

    var qemuArguments: [String] {
        ["-blockdev", "driver=file,filename=\(path),node-name=\(Self.nodeName)-file",
         "-blockdev", "driver=raw,file=\(Self.nodeName)-file,node-name=\(Self.nodeName)",
         "-device", "ide-hd,drive=\(Self.nodeName),bus=ide.0,unit=0"]
    }
}

public final class ReplicatedDisk: @unchecked Sendable {
    public let setup: DiskSetup
    public let export: NBDExport
    private let lock = NSLock()
    private var mirrorStarted = false

    /// Starts the export (before the mirror is set up, which connects to it).
    public init(_ setup: DiskSetup) throws(GeminusError) {
        self.setup = setup
        export = try NBDExport(socketPath: setup.exportSocketPath, diskPath: setup.path, sizeBytes: setup.sizeBytes)
    }

    /// Creates a zeroed raw disk file of `sizeBytes` (a fresh primary's disk).
    public static func createEmpty(_ setup: DiskSetup) throws(GeminusError) {
        unlink(setup.path)
        let fd = open(setup.path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw GeminusError(.io, "cannot create the disk \(setup.path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(setup.sizeBytes)) == 0 else {
            throw GeminusError(.io, "cannot size the disk \(setup.path): \(String(cString: strerror(errno)))")
        }
    }

    /// Called while the guest is paused, after its memory was captured into `buffer`.
    func capture(full: Bool, into buffer: CheckpointBuffer, qmp: QMPClient) throws(GeminusError) {
        lock.lock()
        defer { lock.unlock() }
        buffer.diskSizeBytes = setup.sizeBytes
        if full {
            // The whole disk, as it is now; what the mirror recorded so far is in it.
            _ = export.take()
            buffer.diskWrites = try Self.nonZeroStretches(of: setup)
            if !mirrorStarted {
                try startMirror(qmp)
                mirrorStarted = true
            }
            return
        }
        guard mirrorStarted else {
            throw GeminusError(.internalInvariant, "a delta checkpoint before the disk mirror was set up (a full one comes first)")
        }
        if let lost = export.lost ?? (export.isConnected ? nil : "not connected") {
            throw GeminusError(.io, "the disk mirror's connection to this agent ended (\(lost)): the guest's writes since were not replicated",
                               fix: "restart the agent (the VM is not protected until a new full checkpoint)")
        }
        buffer.diskWrites = export.take()
    }

    private func startMirror(_ qmp: QMPClient) throws(GeminusError) {
        try qmp.execute("blockdev-add", arguments: [
            "driver": "nbd", "node-name": "geminus-replica",
            "server": ["type": "unix", "path": setup.exportSocketPath], "export": export.exportName,
        ])
        try qmp.execute("blockdev-mirror", arguments: [
            "job-id": "geminus-mirror", "device": DiskSetup.nodeName, "target": "geminus-replica",
            "sync": "none", "copy-mode": "write-blocking",
        ])
        // The export has the client once the handshake is done (blockdev-add returns after it).
        let deadline = Monotonic.nanos() + 2_000_000_000
        while !export.isConnected {
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.hypervisor, "QEMU's disk mirror did not connect to \(setup.exportSocketPath)")
            }
            Monotonic.sleep(nanos: 1_000_000)
        }
    }

    /// Every 64 KiB stretch of the disk that is not all zeros (a full checkpoint: the secondary
    /// zeroes its replica first).
    static func nonZeroStretches(of setup: DiskSetup) throws(GeminusError) -> [DiskWrite] {
        let fd = open(setup.path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GeminusError(.io, "cannot read the disk \(setup.path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let chunk = 64 << 10
        var out: [DiskWrite] = []
        var buffer = [UInt8](repeating: 0, count: chunk)
        var offset: UInt64 = 0
        while offset < setup.sizeBytes {
            let want = Int(min(UInt64(chunk), setup.sizeBytes - offset))
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(offset)) }
            guard n == want else { throw GeminusError(.io, "reading the disk \(setup.path) at \(offset) failed: \(n < 0 ? String(cString: strerror(errno)) : "short read")") }
            if buffer.withUnsafeBytes({ geminus_is_zero($0.baseAddress, want) }) == 0 {
                out.append(DiskWrite(offset: offset, data: Array(buffer[0..<want])))
            }
            offset += UInt64(want)
        }
        return out
    }

    public func stop() { export.stop() }
}
