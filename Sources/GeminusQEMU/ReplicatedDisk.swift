import CGeminusSupport
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// The setup of a disk the agent's own QEMU opens (`--guest qemu --disk-mib N`, a raw file of
/// at most `maxSizeBytes`, created zeroed for the first primary). A libvirt domain's disk comes
/// from its definition instead (`LibvirtDisk`); both are replicated by `ReplicatedDisk`.
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

/// A protected guest's disk and where its writes are replicated from. QEMU mirrors every
/// guest write synchronously (`blockdev-mirror`, `copy-mode=write-blocking`) from the disk's
/// node to `NBDExport`, served by the agent itself: a guest write completes only once the export
/// has it, and `stop` drains in-flight I/O, so each checkpoint carries exactly the writes made
/// in its epoch; the secondary applies them only when that epoch commits (`Replica`, through
/// its journal). The first copy is either paused (the disk's non-zero stretches read from a raw
/// file of at most 256 MiB, the mirror set up right after with `sync=none`) or live (the mirror
/// started with `sync=full`, QEMU streaming the whole disk into the export while the guest runs,
/// the only way for a larger or non-raw disk). docs/DISKS.md.
public final class ReplicatedDisk: @unchecked Sendable {
    /// The block node QEMU's guest device writes through (mirrored from).
    public let nodeName: String
    /// The primary's image (READs of the export, and the paused full copy, read it when raw).
    public let imagePath: String
    /// Raw: the image file's bytes are the guest's disk at the same offsets, so the paused
    /// full copy and the export's READs may read the file. A qcow2 file's are not: its every
    /// full copy streams through the mirror (QEMU reads it through its driver), and the export
    /// answers READ with EIO.
    public let imageIsRaw: Bool
    public let sizeBytes: UInt64
    public let export: NBDExport
    private let lock = NSLock()
    private var mirror: MirrorState = .none
    /// The bulk copy of a live first copy is under way (`captureLive(full: true)` started it)
    /// and had not caught up at the last round.
    private var streaming = false
    private var _copied: (done: UInt64, total: UInt64)?
    private var copyStartNanos: UInt64 = 0

    enum MirrorState { case none, running }

    /// The largest disk whose whole copy may ride one paused full checkpoint (the secondary
    /// stages an epoch's writes in memory): larger disks are first copied while the guest runs.
    public static let maxPausedCopyBytes = UInt64(Replica.maxDiskBytesPerEpoch)
    static let jobID = "geminus-mirror"
    static let targetNode = "geminus-replica"

    /// Starts the export (before the mirror is set up, which connects to it).
    public init(nodeName: String, imagePath: String, imageIsRaw: Bool = true, sizeBytes: UInt64, exportSocketPath: String,
                clientUser: String? = nil) throws(GeminusError) {
        guard sizeBytes > 0, sizeBytes % EpochBegin.diskUnitBytes == 0 else {
            throw GeminusError(.invalidArgument, "the disk \(imagePath) has \(sizeBytes) bytes: Geminus replicates disks of whole 4 KiB units",
                               fix: "resize the image to a multiple of 4 KiB on both hosts (`qemu-img resize -f raw IMAGE SIZE`)")
        }
        self.nodeName = nodeName
        self.imagePath = imagePath
        self.imageIsRaw = imageIsRaw
        self.sizeBytes = sizeBytes
        export = try NBDExport(socketPath: exportSocketPath, diskPath: imageIsRaw ? imagePath : nil, sizeBytes: sizeBytes, clientUser: clientUser)
        // The socket was given to QEMU's user: its connections are QEMU's (until `admit` names
        // the very process).
        if let clientUser, let pw = getpwnam(clientUser) { admit(.user(pw.pointee.pw_uid)) }
    }

    /// Only `peer` may connect to the export from now on (the domain's QEMU, by pid).
    public func admit(_ peer: SocketPeer) {
        UnixSocket.expect(peer, onListenerAt: export.socketPath)
    }

    /// A disk the agent's own QEMU opens (`DiskSetup.qemuArguments`).
    public convenience init(_ setup: DiskSetup) throws(GeminusError) {
        try self.init(nodeName: DiskSetup.nodeName, imagePath: setup.path, sizeBytes: setup.sizeBytes,
                      exportSocketPath: setup.exportSocketPath)
    }

    /// Creates a zeroed raw disk file of `sizeBytes` (a fresh primary's disk), mode 0600; a
    /// file or link already at the path is refused (`PrivateFile.createNew`).
    public static func createEmpty(_ setup: DiskSetup) throws(GeminusError) {
        let fd = try PrivateFile.createNew(setup.path, what: "the disk")
        defer { close(fd) }
        guard ftruncate(fd, off_t(setup.sizeBytes)) == 0 else {
            throw GeminusError(.io, "cannot size the disk \(setup.path): \(String(cString: strerror(errno)))")
        }
    }

    /// Every full copy of this disk streams while the guest runs: too large for a paused full
    /// copy, or not raw (the paused copy reads the image file as the guest's bytes).
    public var fullCopyMustBeLive: Bool { sizeBytes > Self.maxPausedCopyBytes || !imageIsRaw }

    /// After a live round: the bulk copy has not caught up yet (the pause must wait for it).
    public var liveCopyPending: Bool { lock.withLock { streaming } }

    /// How far the bulk copy of the running first copy is (bytes done of total), nil when none runs.
    public var copyProgress: (done: UInt64, total: UInt64)? { lock.withLock { streaming ? _copied : nil } }

    /// Called while the guest is paused, after its memory was captured into `buffer`.
    public func capture(full: Bool, into buffer: CheckpointBuffer, qmp: QMPClient) throws(GeminusError) {
        lock.lock()
        defer { lock.unlock() }
        buffer.diskSizeBytes = sizeBytes
        if full {
            guard !fullCopyMustBeLive else {
                throw GeminusError(.internalInvariant, imageIsRaw ? "a paused full copy of a \(sizeBytes >> 20) MiB disk (over \(Self.maxPausedCopyBytes >> 20) MiB streams while the guest runs)"
                                   : "a paused full copy of a non-raw disk (it streams while the guest runs: its file is not the guest's bytes)")
            }
            // The whole disk, as it is now; what the mirror recorded so far is in it.
            streaming = false
            export.keepAll(false)
            _ = export.take()
            buffer.diskWrites = try Self.nonZeroStretches(path: imagePath, sizeBytes: sizeBytes)
            if mirror == .none { try startMirror(qmp, sync: "none") }
            return
        }
        try takeWrites(into: buffer)
        // After the pause that ends a live first copy the port's holding decides (it holds
        // from this checkpoint on).
        streaming = false
        export.keepAll(false)
    }

    /// A round of the live first copy (the guest running). The first round (`full`) starts the
    /// mirror afresh with `sync=full`: QEMU then copies the whole disk into the export in the
    /// background while mirroring every new guest write, and each round takes what arrived.
    /// The secondary zeroes its replica at the first (full) epoch's commit, and every region of
    /// the disk is written again by the bulk copy (zeroes as zero writes), in order with the
    /// guest's own writes.
    public func captureLive(full: Bool, into buffer: CheckpointBuffer, qmp: QMPClient) throws(GeminusError) {
        lock.lock()
        defer { lock.unlock() }
        buffer.diskSizeBytes = sizeBytes
        if full {
            export.keepAll(true)
            _ = export.take()
            try startMirror(qmp, sync: "full")
            streaming = true
            _copied = (0, sizeBytes)
            copyStartNanos = Monotonic.nanos()
            buffer.diskWrites = []
            return
        }
        // Ready before the take: everything the bulk copy wrote is in this round, and the
        // pause carries only the guest's newest writes.
        let caughtUp = try mirrorCaughtUp(qmp)
        try takeWrites(into: buffer)
        if caughtUp { streaming = false }
    }

    /// What `geminus status` shows about the disk and its mirror.
    public var statusLine: String {
        var line = "\(sizeBytes >> 20) MiB, mirror \(export.isConnected ? "connected" : export.lost.map { "LOST (\($0))" } ?? "not started"), \(export.writesReceived) writes"
        if let p = copyProgress {
            line += ", first copy \(p.done * 100 / max(p.total, 1)) % (\(p.done >> 20) of \(p.total >> 20) MiB"
            let seconds = Double(Monotonic.nanos() - lock.withLock { copyStartNanos }) / 1e9
            if seconds > 0.5, p.done > 0 {
                let rate = Double(p.done) / seconds
                line += String(format: ", %.0f MiB/s, about %.0f s left", rate / 1_048_576, Double(p.total - min(p.done, p.total)) / rate)
            }
            line += ")"
        }
        return line
    }

    /// The live copy was abandoned (the link went): nothing more is kept for it.
    public func abandonLiveCopy() {
        lock.withLock { streaming = false }
        export.keepAll(false)
    }

    private func takeWrites(into buffer: CheckpointBuffer) throws(GeminusError) {
        guard mirror == .running else {
            throw GeminusError(.internalInvariant, "a delta checkpoint before the disk mirror was set up (a full one comes first)")
        }
        if let lost = export.lost ?? (export.isConnected ? nil : "not connected") {
            throw GeminusError(.io, "the disk mirror's connection to this agent ended (\(lost)): the guest's writes since were not replicated",
                               fix: "restart the agent (the VM is not protected until a new full checkpoint)")
        }
        buffer.diskWrites = export.take()
    }

    /// Whether the mirror job's bulk copy is done (QEMU says `ready`); records its progress.
    private func mirrorCaughtUp(_ qmp: QMPClient) throws(GeminusError) -> Bool {
        guard let jobs = try qmp.execute("query-block-jobs") as? [[String: Any]],
              let job = jobs.first(where: { $0["device"] as? String == Self.jobID }) else {
            throw GeminusError(.hypervisor, "the disk mirror job \(Self.jobID) is gone from QEMU during the first copy")
        }
        if let offset = (job["offset"] as? NSNumber)?.uint64Value, let len = (job["len"] as? NSNumber)?.uint64Value {
            _copied = (offset, max(len, 1))
        }
        return job["ready"] as? Bool == true
    }

    /// Sets up (or sets up again) the mirror: an NBD node on the export's socket, then
    /// `blockdev-mirror` from the guest's node in write-blocking mode, so a guest write
    /// completes only once the export has it.
    private func startMirror(_ qmp: QMPClient, sync: String) throws(GeminusError) {
        // A mirror of ours may be left in QEMU by an agent that died (a libvirt domain
        // outlives its agent): it goes first, or the node name is taken.
        if mirror == .running || leftoverMirror(qmp) { try stopMirror(qmp) }
        try qmp.execute("blockdev-add", arguments: [
            "driver": "nbd", "node-name": Self.targetNode,
            "server": ["type": "unix", "path": export.socketPath], "export": export.exportName,
        ])
        try qmp.execute("blockdev-mirror", arguments: [
            "job-id": Self.jobID, "device": nodeName, "target": Self.targetNode,
            "sync": sync, "copy-mode": "write-blocking",
        ])
        mirror = .running
        // The export has the client once the handshake is done (blockdev-add returns after it).
        let deadline = Monotonic.nanos() + 2_000_000_000
        while !export.isConnected {
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.hypervisor, "QEMU's disk mirror did not connect to \(export.socketPath)")
            }
            Monotonic.sleep(nanos: 1_000_000)
        }
    }

    /// Whether QEMU has our mirror's job or target node from before this agent.
    private func leftoverMirror(_ qmp: QMPClient) -> Bool {
        let jobs = (try? qmp.execute("query-block-jobs") as? [[String: Any]]) ?? []
        let nodes = (try? qmp.execute("query-named-block-nodes", arguments: ["flat": true]) as? [[String: Any]]) ?? []
        return jobs.contains { $0["device"] as? String == Self.jobID } || nodes.contains { $0["node-name"] as? String == Self.targetNode }
    }

    /// Ends the running mirror job and removes its target node (a new full copy starts over).
    private func stopMirror(_ qmp: QMPClient) throws(GeminusError) {
        _ = try? qmp.execute("block-job-cancel", arguments: ["device": Self.jobID, "force": true])
        let deadline = Monotonic.nanos() + 10_000_000_000
        while let jobs = try qmp.execute("query-block-jobs") as? [[String: Any]],
              jobs.contains(where: { $0["device"] as? String == Self.jobID }) {
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.hypervisor, "QEMU's disk mirror job did not end within 10 s of block-job-cancel")
            }
            Monotonic.sleep(nanos: 5_000_000)
        }
        let nodes = (try? qmp.execute("query-named-block-nodes", arguments: ["flat": true]) as? [[String: Any]]) ?? []
        if nodes.contains(where: { $0["node-name"] as? String == Self.targetNode }) {
            try qmp.execute("blockdev-del", arguments: ["node-name": Self.targetNode])
        }
        mirror = .none
        // The export's session ends when QEMU closes the connection; wait for that, so the
        // new connection is the one `isConnected` reports.
        let closeDeadline = Monotonic.nanos() + 2_000_000_000
        while export.isConnected && Monotonic.nanos() < closeDeadline { Monotonic.sleep(nanos: 1_000_000) }
    }

    /// Every 64 KiB stretch of the disk that is not all zeros (a full checkpoint: the secondary
    /// zeroes its replica first).
    static func nonZeroStretches(path: String, sizeBytes: UInt64) throws(GeminusError) -> [DiskWrite] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw GeminusError(.io, "cannot read the disk \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let chunk = 64 << 10
        var out: [DiskWrite] = []
        var buffer = [UInt8](repeating: 0, count: chunk)
        var offset: UInt64 = 0
        while offset < sizeBytes {
            let want = Int(min(UInt64(chunk), sizeBytes - offset))
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(offset)) }
            guard n == want else { throw GeminusError(.io, "reading the disk \(path) at \(offset) failed: \(n < 0 ? String(cString: strerror(errno)) : "short read")") }
            if buffer.withUnsafeBytes({ geminus_is_zero($0.baseAddress, want) }) == 0 {
                out.append(DiskWrite(offset: offset, data: Array(buffer[0..<want])))
            }
            offset += UInt64(want)
        }
        return out
    }

    /// Leaves the guest's disk unmirrored (the agent lets the guest run on without it): the
    /// mirror job cancelled and its target removed, so no guest write waits for this export.
    public func detach(_ qmp: QMPClient) {
        lock.withLock {
            streaming = false
            if mirror == .running { try? stopMirror(qmp) }
        }
        export.stop()
    }

    public func stop() { export.stop() }
}
