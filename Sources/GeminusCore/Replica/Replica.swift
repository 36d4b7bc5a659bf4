import CGeminusSupport

/// The secondary's copy of the guest: its memory and device state as of the last committed
/// epoch, and the epoch being received.
///
/// Promise S3 lives here: frames of an epoch are decoded into a staging buffer, and the
/// replica's memory is touched only after the epoch's end record arrived and every count and
/// the content digest matched. Any other outcome discards the staging buffer, counts the
/// reason, and leaves the committed state byte-for-byte as it was.
public final class Replica {
    public enum Outcome: Equatable, Sendable {
        /// The frame was staged; the epoch is not complete yet.
        case staged
        /// The epoch was verified and applied; acknowledge it.
        case committed(Epoch, CommitStats)
        /// The epoch was thrown away; the primary must resynchronise.
        case rejected(Epoch, RejectReason, String)
        /// An old or duplicate frame that changes nothing (no resync needed).
        case ignored(RejectReason)
    }

    public struct CommitStats: Equatable, Sendable {
        public var pages: Int
        public var deviceStateBytes: Int
        public var isFull: Bool
        public var diskBytes: Int = 0
        /// A round of the live first copy: a base for the next epoch, not a checkpoint.
        public var isLive: Bool = false
    }

    /// Device state is opaque and usually small (13 KB for the test guest); this bounds it.
    public static let maxDeviceStateBytes = 64 << 20
    /// Disk writes of one epoch are staged in memory until its commit; a full epoch carries the
    /// whole disk, so this is also the largest disk that can be replicated.
    public static let maxDiskBytesPerEpoch = 256 << 20
    /// Zero records carry no data, so the byte cap does not bound them: this does (an epoch
    /// at the byte cap in 4 KiB writes with a zero record between each is 128 Ki records).
    public static let maxDiskRecordsPerEpoch = 1 << 20

    /// The guest's disk, written at commits; nil for a guest without a replicated disk.
    public let disk: (any ReplicaDisk)?

    public let memory: PageMemory
    public var pageCount: Int { memory.pageCount }
    public private(set) var committedEpoch: Epoch = .none
    public private(set) var committedDeviceState: [UInt8] = []
    /// Whether a full epoch has ever been committed: only then is the replica a whole VM.
    public private(set) var hasBaseImage = false
    /// The last commit is a whole checkpoint a standby may resume: a base image with a
    /// consistent epoch on top (not a round of the live first copy, whose pages may be torn).
    public private(set) var isResumable = false
    public private(set) var generation: Generation
    public private(set) var rejections: [RejectReason: Int] = [:]
    public private(set) var commits = 0

    private struct Staging {
        var epoch: Epoch
        var begin: EpochBegin
        var nextSequence: UInt32
    }

    private var staging: Staging?
    /// The last epoch rejected: its remaining frames are dropped quietly, so one bad epoch is
    /// counted (and nacked) once, not once per frame.
    private var discarding: Epoch?
    private let staged: CheckpointBuffer
    private var stagedSet: DirtyPageSet
    private let scratch: UnsafeMutableRawPointer

    public init(memory: PageMemory, generation: Generation = Generation(1), disk: (any ReplicaDisk)? = nil) {
        self.memory = memory
        self.disk = disk
        self.generation = generation
        staged = CheckpointBuffer(limitPages: memory.pageCount)
        stagedSet = DirtyPageSet(pageCount: memory.pageCount)
        scratch = .allocate(byteCount: GuestPage.size, alignment: 64)
    }

    deinit { scratch.deallocate() }

    public var isStaging: Bool { staging != nil }
    public var stagingEpoch: Epoch? { staging?.epoch }

    /// Adopts the generation of a newly authenticated primary. A lower one is never adopted.
    public func adopt(generation g: Generation) {
        precondition(g >= generation, "generations only grow")
        if g > generation { discardStaging() }
        generation = g
    }

    /// Throws away a half-received epoch (the link dropped, or a frame failed its checksum).
    @discardableResult
    public func abandonStaging(reason: RejectReason) -> Outcome? {
        guard let s = staging else { return nil }
        discardStaging()
        return reject(s.epoch, reason, "epoch \(s.epoch) abandoned after \(s.nextSequence) frames")
    }

    /// Counts a frame the transport refused before it could be parsed (checksum failure).
    public func noteCorruptFrame(epoch: Epoch) -> Outcome {
        let e = staging?.epoch ?? epoch
        discardStaging()
        return reject(e, .corruptFrame, "a frame of epoch \(epoch) failed its checksum")
    }

    public func accept(_ frame: Frame) -> Outcome {
        let h = frame.header
        if h.generation < generation {
            return ignore(.staleGeneration)
        }
        if h.generation > generation {
            // Generations change only through the authenticated handshake (adopt).
            return reject(h.epoch, .staleGeneration, "frame of generation \(h.generation) while the pair is at \(generation)")
        }
        if h.epoch == discarding && h.kind != .epochBegin {
            return .ignored(.outOfSequence)
        }
        switch h.kind {
        case .epochBegin:
            return begin(frame)
        case .pages, .deviceState, .diskWrites, .epochEnd:
            guard var s = staging, s.epoch == h.epoch else {
                if h.epoch <= committedEpoch { return ignore(.stale) }
                if let s = staging { discardStaging(); return reject(s.epoch, .torn, "frame of epoch \(h.epoch) arrived while epoch \(s.epoch) was incomplete") }
                return reject(h.epoch, .outOfSequence, "\(h.kind) frame of epoch \(h.epoch) without its begin frame")
            }
            guard h.sequence == s.nextSequence else {
                discardStaging()
                return reject(h.epoch, .outOfSequence, "frame \(h.sequence) of epoch \(h.epoch) where \(s.nextSequence) was expected")
            }
            // Empty frames cost the sender almost nothing; the counter must not be the limit.
            guard s.nextSequence < UInt32.max else {
                discardStaging()
                return reject(h.epoch, .tooLarge, "epoch \(h.epoch) has more than \(UInt32.max) frames")
            }
            s.nextSequence += 1
            staging = s
            switch h.kind {
            case .pages: return stagePages(frame.payload, of: s)
            case .deviceState:
                guard staged.deviceState.count + frame.payload.count <= Self.maxDeviceStateBytes else {
                    discardStaging()
                    return reject(h.epoch, .tooLarge, "device state over \(Self.maxDeviceStateBytes) bytes")
                }
                staged.deviceState.append(contentsOf: frame.payload)
                return .staged
            case .diskWrites: return stageDiskWrites(frame.payload, of: s)
            default: return finish(frame, of: s)
            }
        default:
            preconditionFailure("Replica.accept is for checkpoint frames; \(h.kind) belongs to the link")
        }
    }

    // MARK: - Steps

    private func begin(_ frame: Frame) -> Outcome {
        let e = frame.epoch
        if let s = staging {
            discardStaging()
            _ = reject(s.epoch, .torn, "epoch \(e) began before epoch \(s.epoch) ended")
        }
        guard frame.header.sequence == 0, let b = EpochBegin(decoding: frame.payload) else {
            return reject(e, .badRecord, "malformed epoch-begin record")
        }
        // A committed epoch is carried forward with `next` at takeover; one past the bound
        // could overflow there, far from the frame that brought it.
        guard e.isAcceptable else {
            return reject(e, .badRecord, "epoch \(e) is beyond the highest a pair can reach (\(Epoch.maxAccepted))")
        }
        guard e > committedEpoch else {
            discarding = e
            return ignore(.stale)
        }
        guard b.guestPageCount == UInt64(pageCount) else {
            return reject(e, .geometryMismatch, "primary's guest has \(b.guestPageCount) pages, this replica \(pageCount)")
        }
        let diskBytes = UInt64(b.diskUnits) * EpochBegin.diskUnitBytes
        guard diskBytes == (disk?.sizeBytes ?? 0) else {
            return reject(e, .geometryMismatch, diskBytes == 0 ? "this standby has a replicated disk, the primary's guest none (start both with the same disk settings)"
                          : disk == nil ? "the primary replicates a \(diskBytes >> 20) MiB disk, this standby has none (start it with the same disk settings)"
                          : "the primary's disk has \(diskBytes) bytes, this standby's \(disk!.sizeBytes)")
        }
        if !b.isFull {
            guard hasBaseImage, b.baseEpoch == committedEpoch else {
                return reject(e, .baseMismatch, "delta on epoch \(b.baseEpoch), but epoch \(committedEpoch) is committed here")
            }
        }
        staged.reset()
        staged.isFull = b.isFull
        stagedSet.removeAll()
        discarding = nil
        staging = Staging(epoch: e, begin: b, nextSequence: 1)
        return .staged
    }

    private func stagePages(_ payload: [UInt8], of s: Staging) -> Outcome {
        let e = s.epoch
        let problem: String? = payload.withUnsafeBytes { raw -> String? in
            var offset = 0
            while offset < raw.count {
                guard raw.count - offset >= PageRecordHeader.size else { return "truncated page record" }
                let index = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                let code = raw[offset + 8]
                let length = Int(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 10, as: UInt16.self)))
                offset += PageRecordHeader.size
                guard let encoding = PageEncoding(rawValue: code) else { return "unknown page encoding \(code)" }
                guard index < UInt64(pageCount) else { return "page \(index) beyond the guest's \(pageCount) pages" }
                let page = Int(index)
                guard !stagedSet.contains(page) else { return "page \(page) twice in one epoch" }
                guard raw.count - offset >= length else { return "page \(page) data cut short" }
                if encoding.needsBase && s.begin.isFull { return "page \(page) is a delta inside a full epoch" }
                guard let dst = staged.appendPage(index: page) else { return "more pages than the guest has" }
                stagedSet.insert(page)
                let data = raw.baseAddress! + offset
                offset += length
                switch encoding {
                case .zero, .unchanged:
                    guard length == 0 else { return "page \(page): \(encoding) record with data" }
                    if encoding == .zero {
                        dst.initializeMemory(as: UInt8.self, repeating: 0, count: GuestPage.size)
                    } else {
                        dst.copyMemory(from: memory.page(page), byteCount: GuestPage.size)
                    }
                case .raw:
                    guard length == GuestPage.size else { return "page \(page): raw record of \(length) bytes" }
                    dst.copyMemory(from: data, byteCount: GuestPage.size)
                case .lz4:
                    guard length > 0, LZ4Page.decompress(data, count: length, into: dst) else { return "page \(page): bad LZ4 block" }
                case .xorLZ4:
                    guard length > 0, LZ4Page.decompress(data, count: length, into: scratch) else { return "page \(page): bad LZ4 block" }
                    _ = geminus_xor(dst, scratch, memory.page(page), GuestPage.size)
                }
            }
            return nil
        }
        if let problem {
            discardStaging()
            return reject(e, .badRecord, problem)
        }
        return .staged
    }

    private func stageDiskWrites(_ payload: [UInt8], of s: Staging) -> Outcome {
        guard let disk else {
            discardStaging()
            return reject(s.epoch, .geometryMismatch, "the primary replicates a disk, this standby has none (start it with the same disk settings)")
        }
        var r = ByteReader(payload)
        var total = staged.diskBytes
        while r.remaining > 0 {
            guard let offset = r.u64(), let length = r.u32(), let flags = r.u32() else {
                discardStaging()
                return reject(s.epoch, .badRecord, "truncated disk write record")
            }
            guard flags & ~DiskWrite.knownFlags == 0 else {
                discardStaging()
                return reject(s.epoch, .badRecord, "disk write record with unknown flags \(flags)")
            }
            guard UInt64(length) <= disk.sizeBytes && offset <= disk.sizeBytes - UInt64(length) else {
                discardStaging()
                return reject(s.epoch, .geometryMismatch, "disk write at \(offset)+\(length) beyond this replica's \(disk.sizeBytes)-byte disk")
            }
            guard staged.diskWrites.count < Self.maxDiskRecordsPerEpoch else {
                discardStaging()
                return reject(s.epoch, .tooLarge, "over \(Self.maxDiskRecordsPerEpoch) disk write records in one epoch")
            }
            if flags & DiskWrite.zeroesFlag != 0 {
                // No data follows; staged as it is and applied (as a hole) at the commit.
                staged.diskWrites.append(.zeroes(offset: offset, length: UInt64(length)))
                continue
            }
            guard let data = r.take(Int(length)) else {
                discardStaging()
                return reject(s.epoch, .badRecord, "truncated disk write record")
            }
            // The cap counts data bytes: a zero record stages 16 bytes whatever it zeroes.
            total += Int(length)
            guard total <= Self.maxDiskBytesPerEpoch else {
                discardStaging()
                return reject(s.epoch, .tooLarge, "disk writes of one epoch over \(Self.maxDiskBytesPerEpoch >> 20) MiB")
            }
            staged.diskWrites.append(DiskWrite(offset: offset, data: Array(data)))
        }
        return .staged
    }

    private func finish(_ frame: Frame, of s: Staging) -> Outcome {
        let e = s.epoch
        defer { discardStaging() }
        guard let end = EpochEnd(decoding: frame.payload) else {
            return reject(e, .badRecord, "malformed epoch-end record")
        }
        guard end.frameCount == frame.header.sequence, end.pageCount == UInt32(staged.pageCount),
              end.deviceStateBytes == UInt32(staged.deviceState.count), end.diskBytes == UInt32(staged.diskBytes) else {
            return reject(e, .countMismatch, "end record says \(end.frameCount) frames, \(end.pageCount) pages, \(end.deviceStateBytes) state bytes, \(end.diskBytes) disk bytes; received \(frame.header.sequence), \(staged.pageCount), \(staged.deviceState.count), \(staged.diskBytes)")
        }
        if s.begin.isFull && staged.pageCount != pageCount {
            return reject(e, .countMismatch, "full epoch with \(staged.pageCount) of \(pageCount) pages")
        }
        let digest = staged.digest()
        guard digest == end.digest else {
            return reject(e, .digestMismatch, "decoded contents hash to \(hex(digest)), primary captured \(hex(end.digest))")
        }
        // The disk first: it is the one step that can fail (I/O). A failure leaves the replica
        // no whole VM (memory still at the last commit, disk part-way), so it is marked as
        // needing a full epoch and cannot be resumed until it has one.
        // Every epoch goes to the disk, even without writes: the first paused epoch after a live
        // copy is what makes the disk image a checkpoint (FileReplicaDisk's durability notes).
        if let disk {
            do throws(GeminusError) {
                try disk.commit(DiskCommit(epoch: e, writes: staged.diskWrites, replacesDisk: s.begin.isFull, isLive: s.begin.isLive))
            } catch {
                hasBaseImage = false
                isResumable = false
                return reject(e, .diskFailure, "applying epoch \(e)'s disk writes failed: \(error.message)")
            }
        }
        // Verified and the disk written: from here on nothing can fail, so the replica moves
        // from one whole checkpoint to the next.
        for i in 0..<staged.pageCount {
            memory.page(staged.pageIndices[i]).copyMemory(from: staged.contents(at: i), byteCount: GuestPage.size)
        }
        committedDeviceState = staged.deviceState
        precondition(e > committedEpoch, "committed epochs only grow")
        committedEpoch = e
        if s.begin.isFull { hasBaseImage = true }
        isResumable = hasBaseImage && !s.begin.isLive
        commits += 1
        return .committed(e, CommitStats(pages: staged.pageCount, deviceStateBytes: staged.deviceState.count, isFull: s.begin.isFull,
                                         diskBytes: staged.diskBytes, isLive: s.begin.isLive))
    }

    private func discardStaging() {
        staging = nil
        staged.reset()
        stagedSet.removeAll()
    }

    private func reject(_ e: Epoch, _ reason: RejectReason, _ detail: String) -> Outcome {
        rejections[reason, default: 0] += 1
        discarding = e
        return .rejected(e, reason, detail)
    }

    private func ignore(_ reason: RejectReason) -> Outcome {
        rejections[reason, default: 0] += 1
        return .ignored(reason)
    }
}

func hex(_ v: UInt64) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: 16 - s.count) + s
}
