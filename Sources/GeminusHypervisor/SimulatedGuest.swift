import CGeminusSupport
import GeminusCore

/// The simulated guest's machine: RAM, a dirty-page bitmap, and a deterministic CPU that runs
/// one `step` at a time. No threads and no clock: the real-time runner (`SimulatedVM`) and the
/// deterministic simulator both drive it through `step()`.
///
/// Guest-physical layout (all little-endian), so the same reader works for the RAM file of a
/// real test guest and for this one:
/// - page 0, the status page: magic, counter (one per step), output sequence, seed, and the
///   disk block last written with the counter of that write (both 0 before the first);
/// - page 1: ring of the last 256 outputs as (sequence, counter) pairs;
/// - pages 2..<8: reserved;
/// - pages 8...: the work area the workload writes.
///
/// With `SimulatedWorkload.diskBlocks` the guest also has a small disk (in memory): every
/// `diskWriteEverySteps` steps it writes one whole block whose contents follow from the block
/// number, the counter and the seed (`diskBlockContents`), and records that write in its RAM
/// (page 0), so memory and disk can be checked against each other. With
/// `SimulatedWorkload.nicFrames` every output of even sequence number leaves through the NIC as
/// an Ethernet frame (`SimulatedNICFrame`), the others as console lines.
public final class SimulatedGuest: @unchecked Sendable {
    public static let magic: UInt64 = 0x4745_4D49_4E55_5331 // "GEMINUS1"
    public static let counterAddress = 8
    public static let outputSequenceAddress = 16
    public static let seedAddress = 24
    /// The disk block last written, and the counter at that write (0: no write yet).
    public static let lastDiskBlockAddress = 32
    public static let lastDiskCounterAddress = 40
    public static let diskBlockSize = 4096
    public static let ringPage = 1
    public static let ringEntries = 256
    public static let workAreaFirstPage = 8
    public static let minimumPages = 16
    /// Opaque device models make real device state about 13 KB; this one is the same size so
    /// the device-state path carries a realistic load.
    static let deviceRegisterBytes = 12 << 10

    public let workload: SimulatedWorkload
    public let memory: PageMemory
    public private(set) var written: DirtyPageSet
    private var rng: Xoshiro256
    private var registers: [UInt8]
    /// A packet produced but not yet taken by the output port, like a frame in a NIC's TX ring.
    public private(set) var pendingOutput: [UInt8]?
    private let stepsPerOutput: UInt64
    private let textCorpus: [UInt8]
    /// The guest's disk (`workload.diskBlocks` blocks; empty without one).
    public private(set) var disk: [UInt8]
    /// Blocks written since the last capture, in block order at capture.
    private var diskWritten: [Bool]

    public var counter: UInt64 { memory.loadU64(at: Self.counterAddress) }
    public var outputSequence: UInt64 { memory.loadU64(at: Self.outputSequenceAddress) }

    /// Boots a fresh guest: RAM filled with the workload's kind of content.
    public init(workload: SimulatedWorkload, memory: PageMemory) throws(GeminusError) {
        try workload.validate()
        guard memory.pageCount == workload.pageCount, memory.pageCount >= Self.minimumPages else {
            throw GeminusError(.invalidArgument, "simulated guest needs \(workload.pageCount) pages (at least \(Self.minimumPages)), memory has \(memory.pageCount)")
        }
        self.workload = workload
        self.memory = memory
        written = DirtyPageSet(pageCount: memory.pageCount)
        rng = Xoshiro256(seed: workload.seed)
        registers = Array(repeating: 0, count: Self.deviceRegisterBytes)
        stepsPerOutput = Self.stepsPerOutput(workload)
        textCorpus = Self.makeCorpus(seed: workload.seed)
        disk = Array(repeating: 0, count: workload.diskSizeBytes)
        diskWritten = Array(repeating: false, count: workload.diskBlocks)
        boot()
    }

    /// Resumes a guest from a checkpoint: `memory` holds its pages, `deviceState` its CPU and
    /// devices, `disk` its disk (for a workload with one). The next step continues exactly where
    /// the checkpointed guest would have.
    public init(memory: PageMemory, deviceState: [UInt8], disk: [UInt8]? = nil) throws(GeminusError) {
        guard let state = DeviceState(decoding: deviceState) else {
            throw GeminusError(.hypervisor, "device state is not a simulated guest's (\(deviceState.count) bytes)",
                               fix: "resume only checkpoints produced by a simulated primary")
        }
        guard memory.pageCount == state.workload.pageCount, memory.loadU64(at: 0) == Self.magic else {
            throw GeminusError(.hypervisor, "replica memory does not hold the simulated guest the device state describes")
        }
        guard (disk ?? []).count == state.workload.diskSizeBytes else {
            throw GeminusError(.hypervisor, "the simulated guest has a disk of \(state.workload.diskSizeBytes) bytes, the standby gave \((disk ?? []).count)")
        }
        self.disk = disk ?? []
        diskWritten = Array(repeating: false, count: state.workload.diskBlocks)
        workload = state.workload
        self.memory = memory
        written = DirtyPageSet(pageCount: memory.pageCount)
        rng = state.rng
        registers = state.registers
        pendingOutput = state.pendingOutput
        stepsPerOutput = Self.stepsPerOutput(workload)
        textCorpus = Self.makeCorpus(seed: workload.seed)
    }

    /// Steps between two outputs (0: the workload sends none).
    private static func stepsPerOutput(_ w: SimulatedWorkload) -> UInt64 {
        w.outputsPerSecond == 0 ? 0 : UInt64(max(1, w.dirtyPagesPerSecond / w.outputsPerSecond))
    }

    private func boot() {
        memory.storeU64(Self.magic, at: 0)
        memory.storeU64(0, at: Self.counterAddress)
        memory.storeU64(0, at: Self.outputSequenceAddress)
        memory.storeU64(workload.seed, at: 24)
        for page in Self.workAreaFirstPage..<memory.pageCount {
            // Most of a freshly booted guest's memory is still zero; the rest is a mix.
            switch rng.next() % 10 {
            case 0..<4: break
            case 4..<8: fillText(page)
            case 8: fillRandom(page)
            default: fillText(page)
            }
        }
        written.insertAll()
    }

    // MARK: - Running

    /// One unit of guest work: bump the counter, write one page, maybe produce an output.
    /// Returns false without doing anything while an output is still pending.
    @discardableResult
    public func step() -> Bool {
        guard pendingOutput == nil else { return false }
        let c = counter &+ 1
        memory.storeU64(c, at: Self.counterAddress)
        written.insert(0)
        let page = pickPage()
        write(page: page, counter: c)
        let slot = Int(c % UInt64(Self.deviceRegisterBytes / 8)) * 8
        registers.withUnsafeMutableBytes { $0.storeBytes(of: c.littleEndian, toByteOffset: slot, as: UInt64.self) }
        if stepsPerOutput > 0 && c % stepsPerOutput == 0 {
            let seq = outputSequence + 1
            memory.storeU64(seq, at: Self.outputSequenceAddress)
            let ring = Self.ringPage * GuestPage.size + Int(seq % UInt64(Self.ringEntries)) * 16
            memory.storeU64(seq, at: ring)
            memory.storeU64(c, at: ring + 8)
            written.insert(Self.ringPage)
            pendingOutput = OutputPacket(sequence: seq, counter: c, seed: workload.seed).encoded()
        }
        if workload.diskBlocks > 0 && c % UInt64(workload.diskWriteEverySteps) == 0 {
            writeDisk(counter: c)
        }
        return true
    }

    /// Hands the pending output to `port` (as a NIC frame or a console line, see
    /// `sendsAsFrame`); true when nothing is pending any more.
    public func flushOutput(to port: any GuestOutputPort) -> Bool {
        guard let packet = pendingOutput else { return true }
        let sequence = OutputPacket(decoding: packet)?.sequence ?? 0
        if Self.sendsAsFrame(sequence: sequence, workload) {
            guard port.offerFrame(SimulatedNICFrame.wrap(packet, seed: workload.seed)) else { return false }
        } else {
            guard port.offer(packet) else { return false }
        }
        pendingOutput = nil
        return true
    }

    /// Whether output `sequence` of a guest running `workload` leaves as a NIC frame.
    public static func sendsAsFrame(sequence: UInt64, _ workload: SimulatedWorkload) -> Bool {
        workload.nicFrames && sequence % 2 == 0
    }

    // MARK: - Disk

    /// One block write: contents that follow from (block, counter, seed), recorded in RAM.
    private func writeDisk(counter c: UInt64) {
        var mix = Xoshiro256(seed: c ^ workload.seed ^ 0x6469_736B)
        let block = Int(mix.next() % UInt64(workload.diskBlocks))
        let contents = Self.diskBlockContents(block: block, counter: c, seed: workload.seed)
        disk.replaceSubrange(block * Self.diskBlockSize..<(block + 1) * Self.diskBlockSize, with: contents)
        diskWritten[block] = true
        memory.storeU64(UInt64(block), at: Self.lastDiskBlockAddress)
        memory.storeU64(c, at: Self.lastDiskCounterAddress)
    }

    private func diskBlockIsZero(_ b: Int) -> Bool {
        disk.withUnsafeBytes { geminus_is_zero($0.baseAddress! + b * Self.diskBlockSize, Self.diskBlockSize) != 0 }
    }

    /// What block `block` holds after the write made at `counter`: a header (block, counter,
    /// seed) and words derived from them.
    public static func diskBlockContents(block: Int, counter: UInt64, seed: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: diskBlockSize)
        w.u64(UInt64(block))
        w.u64(counter)
        w.u64(seed)
        var x = Xoshiro256(seed: counter &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(block) ^ seed)
        while w.bytes.count < diskBlockSize { w.u64(x.next()) }
        return w.bytes
    }

    /// Whether the disk agrees with memory: the write RAM says came last is on the disk with
    /// exactly its contents, and every other block written holds one whole write made no later
    /// than the counter (no write from a later epoch, no torn block). Nil when consistent.
    public func diskInconsistency() -> String? {
        guard workload.diskBlocks > 0 else { return nil }
        let seed = workload.seed
        let lastBlock = Int(memory.loadU64(at: Self.lastDiskBlockAddress))
        let lastCounter = memory.loadU64(at: Self.lastDiskCounterAddress)
        func blockBytes(_ b: Int) -> ArraySlice<UInt8> { disk[b * Self.diskBlockSize..<(b + 1) * Self.diskBlockSize] }
        if lastCounter > 0 {
            guard lastBlock < workload.diskBlocks else { return "RAM records a write to block \(lastBlock), beyond the \(workload.diskBlocks)-block disk" }
            if !blockBytes(lastBlock).elementsEqual(Self.diskBlockContents(block: lastBlock, counter: lastCounter, seed: seed)) {
                return "RAM says block \(lastBlock) was last written at counter \(lastCounter), the disk holds something else there"
            }
        }
        for b in 0..<workload.diskBlocks {
            if diskBlockIsZero(b) { continue }
            let bytes = Array(blockBytes(b))
            var r = ByteReader(bytes)
            guard r.u64() == UInt64(b), let c = r.u64(), bytes == Self.diskBlockContents(block: b, counter: c, seed: seed) else {
                return "disk block \(b) holds no whole write of this guest"
            }
            if c > counter { return "disk block \(b) holds the write of counter \(c), after the guest's counter \(counter)" }
            if c > lastCounter { return "disk block \(b) holds the write of counter \(c), after the last write RAM records (\(lastCounter))" }
        }
        return nil
    }

    /// The ring of recent outputs, oldest first: what this guest's history says it sent.
    public func recentOutputs() -> [OutputRecord] {
        TestGuestHistory(memory: memory, deviceState: []).recent
    }

    // MARK: - Checkpointing

    /// Copies the written pages (or all) and the device state into `buffer`; starts a new set.
    public func capture(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        buffer.reset()
        buffer.isFull = full
        if full { written.insertAll() }
        var overflow = false
        written.forEach { page in
            if !overflow && !buffer.appendPage(index: page, copying: memory.page(page)) { overflow = true }
        }
        guard !overflow else {
            throw GeminusError(.resourceExhausted, "capture buffer holds \(buffer.limitPages) pages, guest wrote \(written.count)")
        }
        written.removeAll()
        buffer.deviceState = DeviceState(workload: workload, rng: rng, registers: registers, pendingOutput: pendingOutput).encoded()
        if workload.diskBlocks > 0 {
            // As the real replicated disk: a delta carries the blocks written since the last
            // capture, a full checkpoint every block that is not all zeros (the secondary zeroes
            // its replica first).
            buffer.diskSizeBytes = UInt64(disk.count)
            for b in 0..<workload.diskBlocks where full || diskWritten[b] {
                if full && diskBlockIsZero(b) { continue }
                let bytes = Array(disk[b * Self.diskBlockSize..<(b + 1) * Self.diskBlockSize])
                buffer.diskWrites.append(DiskWrite(offset: UInt64(b * Self.diskBlockSize), data: bytes))
            }
            for b in diskWritten.indices { diskWritten[b] = false }
        }
    }

    // MARK: - Workload

    private func pickPage() -> Int {
        let first = Self.workAreaFirstPage
        let area = memory.pageCount - first
        let hot = max(1, Int(Double(area) * workload.hotFraction))
        let r = rng.next()
        if Double(r >> 11) / Double(1 << 53) < workload.hotShare {
            return first + Int(rng.next() % UInt64(hot))
        }
        return first + Int(rng.next() % UInt64(area))
    }

    private func write(page: Int, counter c: UInt64) {
        var kind = workload.content
        if kind == .mixed {
            switch rng.next() % 20 {
            case 0, 1: kind = .zeros
            case 2..<6: kind = .text
            case 6, 7: kind = .random
            default: kind = .smallEdits
            }
        }
        switch kind {
        case .zeros: memory.page(page).initializeMemory(as: UInt8.self, repeating: 0, count: GuestPage.size)
        case .text: fillText(page)
        case .random: fillRandom(page)
        case .smallEdits, .mixed:
            let p = memory.page(page)
            for _ in 0..<(1 + rng.next() % 4) {
                let offset = Int(rng.next() % UInt64(GuestPage.size / 8)) * 8
                p.storeBytes(of: (c ^ rng.next() & 0xFFFF).littleEndian, toByteOffset: offset, as: UInt64.self)
            }
        }
        written.insert(page)
    }

    private func fillText(_ page: Int) {
        let offset = Int(rng.next() % UInt64(textCorpus.count - GuestPage.size))
        textCorpus.withUnsafeBytes { memory.page(page).copyMemory(from: $0.baseAddress! + offset, byteCount: GuestPage.size) }
    }

    private func fillRandom(_ page: Int) {
        let p = memory.page(page)
        for i in 0..<(GuestPage.size / 8) { p.storeBytes(of: rng.next(), toByteOffset: i * 8, as: UInt64.self) }
    }

    /// 64 KiB of log-like lines; pages of "text" are windows into it, which compress like logs do.
    private static func makeCorpus(seed: UInt64) -> [UInt8] {
        var rng = Xoshiro256(seed: seed ^ 0x7465_7874)
        let words = ["invoice", "account", "charged", "EUR", "USD", "status=ok", "retry", "customer", "ledger",
                     "balance", "debit", "credit", "txn", "settled", "pending", "{\"id\":", "\"amount\":", "},"]
        var out = [UInt8]()
        out.reserveCapacity(70_000)
        while out.count < 64 << 10 {
            out.append(contentsOf: "2026-11-25T10:\(rng.next() % 60):\(rng.next() % 60) ".utf8)
            for _ in 0..<(4 + rng.next() % 8) {
                out.append(contentsOf: words[Int(rng.next() % UInt64(words.count))].utf8)
                out.append(contentsOf: " \(rng.next() % 100_000) ".utf8)
            }
            out.append(10)
        }
        return out
    }
}

/// A packet the simulated guest emits: its sequence number, the counter at the step that
/// produced it, and a check value an observer can verify without knowing the guest.
public struct OutputPacket: Equatable, Sendable {
    public static let size = 24
    public var sequence: UInt64
    public var counter: UInt64
    public var check: UInt64

    public init(sequence: UInt64, counter: UInt64, seed: UInt64) {
        self.sequence = sequence
        self.counter = counter
        check = Self.checkValue(sequence: sequence, counter: counter, seed: seed)
    }

    public static func checkValue(sequence: UInt64, counter: UInt64, seed: UInt64) -> UInt64 {
        var x = Xoshiro256(seed: sequence &* 0x9E37_79B9_7F4A_7C15 ^ counter ^ seed)
        return x.next()
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.size)
        w.u64(sequence)
        w.u64(counter)
        w.u64(check)
        return w.bytes
    }

    public init?(decoding bytes: [UInt8]) {
        var r = ByteReader(bytes)
        guard bytes.count == Self.size, let s = r.u64(), let c = r.u64(), let k = r.u64() else { return nil }
        sequence = s
        counter = c
        check = k
    }
}

/// The simulated guest's CPU and device state, as carried in checkpoints.
struct DeviceState {
    static let magic: UInt32 = 0x5649_4D53 // "SMIV"
    var workload: SimulatedWorkload
    var rng: Xoshiro256
    var registers: [UInt8]
    var pendingOutput: [UInt8]?

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 64 + registers.count)
        // Version 1 for a guest without frames or disk (as before they existed), 2 with them.
        let version: UInt32 = workload.nicFrames || workload.diskBlocks > 0 ? 2 : 1
        w.u32(Self.magic)
        w.u32(version)
        w.u64(UInt64(workload.ramMiB))
        w.u64(UInt64(workload.dirtyPagesPerSecond))
        w.u64(workload.hotFraction.bitPattern)
        w.u64(workload.hotShare.bitPattern)
        w.u8(UInt8(PageContent.allCases.firstIndex(of: workload.content)!))
        w.u64(UInt64(workload.outputsPerSecond))
        w.u64(workload.seed)
        w.u64(rng.s.0); w.u64(rng.s.1); w.u64(rng.s.2); w.u64(rng.s.3)
        w.u32(UInt32(registers.count))
        w.append(registers)
        w.u32(UInt32(pendingOutput?.count ?? 0))
        if let p = pendingOutput { w.append(p) }
        if version == 2 {
            w.u8(workload.nicFrames ? 1 : 0)
            w.u64(UInt64(workload.diskBlocks))
            w.u64(UInt64(workload.diskWriteEverySteps))
        }
        return w.bytes
    }

    init(workload: SimulatedWorkload, rng: Xoshiro256, registers: [UInt8], pendingOutput: [UInt8]?) {
        self.workload = workload
        self.rng = rng
        self.registers = registers
        self.pendingOutput = pendingOutput
    }

    init?(decoding bytes: [UInt8]) {
        var r = ByteReader(bytes)
        guard r.u32() == Self.magic, let version = r.u32(), version == 1 || version == 2, let ram = r.u64(), let rate = r.u64(), let hf = r.u64(), let hs = r.u64(),
              let content = r.u8(), Int(content) < PageContent.allCases.count, let outs = r.u64(), let seed = r.u64(),
              let s0 = r.u64(), let s1 = r.u64(), let s2 = r.u64(), let s3 = r.u64(),
              let nreg = r.u32(), nreg <= 1 << 20, let reg = r.take(Int(nreg)),
              let npend = r.u32(), npend <= 1 << 16, let pend = r.take(Int(npend)) else { return nil }
        var nicFrames = false, diskBlocks = 0, diskEvery = 64
        if version == 2 {
            guard let f = r.u8(), f <= 1, let blocks = r.u64(), blocks <= 65_536, let every = r.u64(), every >= 1, every <= 1 << 32 else { return nil }
            nicFrames = f == 1
            diskBlocks = Int(blocks)
            diskEvery = Int(every)
        }
        guard r.remaining == 0 else { return nil }
        workload = SimulatedWorkload(ramMiB: Int(ram), dirtyPagesPerSecond: Int(rate), hotFraction: Double(bitPattern: hf),
                                     hotShare: Double(bitPattern: hs), content: PageContent.allCases[Int(content)],
                                     outputsPerSecond: Int(outs), seed: seed)
        workload.nicFrames = nicFrames
        workload.diskBlocks = diskBlocks
        workload.diskWriteEverySteps = diskEvery
        rng = Xoshiro256(state: (s0, s1, s2, s3))
        registers = Array(reg)
        pendingOutput = npend == 0 ? nil : Array(pend)
    }
}

/// One entry of a test guest's output history.
public struct OutputRecord: Sendable, Equatable {
    public var sequence: UInt64
    public var counter: UInt64
    public init(sequence: UInt64, counter: UInt64) {
        self.sequence = sequence
        self.counter = counter
    }
}

/// What a checkpoint of a simulated guest says it has sent: read from its memory and device
/// state without running it, so a takeover can report exactly what the resumed guest will
/// stand behind.
public struct TestGuestHistory: Sendable {
    public var outputSequence: UInt64 = 0
    public var recent: [OutputRecord] = []
    public var pendingSequence: UInt64?

    public init(memory: PageMemory, deviceState: [UInt8]) {
        guard memory.pageCount >= SimulatedGuest.minimumPages, memory.loadU64(at: 0) == SimulatedGuest.magic else { return }
        outputSequence = memory.loadU64(at: SimulatedGuest.outputSequenceAddress)
        let last = outputSequence
        if last >= 1 {
            let first = last >= UInt64(SimulatedGuest.ringEntries) ? last - UInt64(SimulatedGuest.ringEntries) + 1 : 1
            recent = (first...last).map { seq in
                let slot = SimulatedGuest.ringPage * GuestPage.size + Int(seq % UInt64(SimulatedGuest.ringEntries)) * 16
                return OutputRecord(sequence: memory.loadU64(at: slot), counter: memory.loadU64(at: slot + 8))
            }
        }
        if let state = DeviceState(decoding: deviceState), let p = state.pendingOutput, let packet = OutputPacket(decoding: p) {
            pendingSequence = packet.sequence
        }
    }
}

/// The Ethernet frame a simulated guest's NIC sends for one output packet: broadcast, from a
/// locally administered address derived from the seed, EtherType 0x88B5 (local experimental),
/// the 24-byte packet, zero padding to the 60-byte minimum (no FCS, as a tap device hands it).
public enum SimulatedNICFrame {
    public static let size = 60
    public static let etherType: UInt16 = 0x88B5

    public static func source(seed: UInt64) -> [UInt8] {
        [0x52, 0x54, 0x00, UInt8(truncatingIfNeeded: seed >> 16), UInt8(truncatingIfNeeded: seed >> 8), UInt8(truncatingIfNeeded: seed)]
    }

    public static func wrap(_ packet: [UInt8], seed: UInt64) -> [UInt8] {
        var f = [UInt8](repeating: 0xFF, count: 6)
        f += source(seed: seed)
        f += [UInt8(etherType >> 8), UInt8(etherType & 0xFF)]
        f += packet
        if f.count < size { f += [UInt8](repeating: 0, count: size - f.count) }
        return f
    }

    /// The packet a frame of this guest carries, or nil for any other frame.
    public static func unwrap(_ frame: [UInt8], seed: UInt64) -> [UInt8]? {
        guard frame.count == size, frame[0..<6].allSatisfy({ $0 == 0xFF }), Array(frame[6..<12]) == source(seed: seed),
              frame[12] == UInt8(etherType >> 8), frame[13] == UInt8(etherType & 0xFF),
              frame[(14 + OutputPacket.size)...].allSatisfy({ $0 == 0 }) else { return nil }
        return Array(frame[14..<14 + OutputPacket.size])
    }
}

/// S2 judged from outside, the one rule the simulator's checks and `geminus demo` apply: every
/// packet a primary released must be in the history of the checkpoint the secondary resumed
/// (not beyond its last output, and with the same counter where its ring remembers one).
/// Anything else is output the resumed VM contradicts: a client saw a history that was un-sent.
public enum ReleasedOutputCheck {
    public struct Verdict: Sendable, Equatable {
        /// Released packets newer than anything the resumed guest had produced.
        public var beyond: [OutputPacket] = []
        /// Released packets whose counter disagrees with the resumed guest's own record.
        public var mismatched: [OutputPacket] = []
        public var holds: Bool { beyond.isEmpty && mismatched.isEmpty }
    }

    /// - Parameters:
    ///   - outputSequence: the last output the resumed checkpoint had produced.
    ///   - history: sequence → counter, as far as the resumed checkpoint's ring remembers.
    public static func judge(_ released: [OutputPacket], outputSequence: UInt64, history: [UInt64: UInt64]) -> Verdict {
        var v = Verdict()
        for p in released {
            if p.sequence > outputSequence { v.beyond.append(p) }
            else if let c = history[p.sequence], c != p.counter { v.mismatched.append(p) }
        }
        return v
    }
}
