import GeminusCore
import GeminusHypervisor
import GeminusNode
import GeminusReplication

/// The world outside the pair: every packet a client received, whichever copy sent it. Two
/// different packets with one sequence number mean the world saw a history "un-sent".
struct OutputObserver {
    enum Source: String { case primary, resumed }
    struct Seen { var counter: UInt64; var source: Source }
    private(set) var bySequence: [UInt64: Seen] = [:]
    private(set) var released: [OutputPacket] = []
    /// Whether each of `released` left through an acknowledged epoch (true) or passed through
    /// a primary that had declared the VM unprotected (false).
    private(set) var releasedHeld: [Bool] = []
    /// Identical packets seen again (the resumed guest re-sends the one pending at its checkpoint).
    private(set) var resent = 0

    /// Records a packet; returns the earlier, different packet of the same sequence, if any.
    mutating func record(_ p: OutputPacket, from source: Source, held: Bool = false) -> Seen? {
        if let earlier = bySequence[p.sequence] {
            if earlier.counter == p.counter { resent += 1; return nil }
            return earlier
        }
        bySequence[p.sequence] = Seen(counter: p.counter, source: source)
        if source == .primary {
            released.append(p)
            releasedHeld.append(held)
        }
        return nil
    }
}

extension PairSimulator {
    /// S2 at the moment output leaves the primary.
    func checkRelease(_ packet: OutputPacket, byPrimary p: PrimaryNode, held: Bool) {
        let generation = p.generation
        if let earlier = observer.record(packet, from: .primary, held: held) {
            let message = "the primary released output #\(packet.sequence) (counter \(packet.counter)), but the \(earlier.source.rawValue) copy already sent #\(packet.sequence) with counter \(earlier.counter)"
            if splitBrainIsKnownGap { knownGap(.s2, message, onceAs: "s2-conflict") } else { violate(.s2, message, onceAs: "s2-conflict") }
        }
        if let contained = resumedOutputSequence {
            // After the takeover the old primary may still release what the secondary had
            // acknowledged (the resumed guest stands behind it); anything beyond that history
            // is output the new primary will contradict.
            if packet.sequence > contained {
                let message = "the deposed primary (generation \(generation)) released output #\(packet.sequence), beyond #\(contained) that the resumed guest stands behind"
                if splitBrainIsKnownGap && !held { knownGap(.s2, message, onceAs: "s2-deposed") } else { violate(.s2, message, onceAs: "s2-deposed") }
            }
            return
        }
        if held {
            if packet.sequence > committedOutputHighWater {
                violate(.s2, "output #\(packet.sequence) released, but no checkpoint the secondary committed contains it (highest #\(committedOutputHighWater))", onceAs: "s2-uncommitted")
            }
        } else if p.machine.protection != .unprotected {
            violate(.s2, "output #\(packet.sequence) passed straight through while the primary was \(p.machine.protection), not reported unprotected", onceAs: "s2-passthrough")
        }
    }

    func checkReleaseByResumed(_ packet: OutputPacket) {
        if let earlier = observer.record(packet, from: .resumed) {
            let message = "the resumed guest sent output #\(packet.sequence) with counter \(packet.counter), but the \(earlier.source.rawValue) already released #\(packet.sequence) with counter \(earlier.counter): released output was un-sent"
            if splitBrainIsKnownGap { knownGap(.s2, message, onceAs: "s2-conflict") } else { violate(.s2, message, onceAs: "s2-conflict") }
        }
    }

    /// S3 at a commit: the replica is the guest exactly as captured at that epoch.
    func checkCommit(_ e: Epoch, isFull: Bool, _ s: SimSecondaryHost) {
        guard let replica = s.replica else { return }
        if s.commitsThisIncarnation == 1 && !isFull {
            violate(.s3, "the first checkpoint secondary incarnation \(s.incarnation) committed (epoch \(e)) was a delta, not a full epoch", onceAs: "s3-first-delta-\(s.incarnation)")
        }
        guard let cap = captured[e] else {
            violate(.s3, "the secondary committed epoch \(e), which the primary never captured", onceAs: "s3-uncaptured")
            return
        }
        if digest(replica.memory) != cap.memoryDigest || digest(replica.committedDeviceState) != cap.deviceStateDigest {
            violate(.s3, "after committing epoch \(e) the replica differs from the guest as captured at epoch \(e)", onceAs: "s3-commit")
        }
        if let disk = replicaDisk(s), digest(disk.bytes) != cap.diskDigest {
            violate(.s3, "after committing epoch \(e) the replica disk differs from the guest's disk as captured at epoch \(e)", onceAs: "s3-commit-disk")
        }
        committedOutputHighWater = max(committedOutputHighWater, replica.memory.loadU64(at: SimulatedGuest.outputSequenceAddress))
        // Commits only move forward, so older captures can never be needed again.
        captured = captured.filter { $0.key >= e }
    }

    /// S3 after any frame reached the replica: it still equals the last committed capture.
    func checkReplica(_ s: SimSecondaryHost) {
        guard let replica = s.replica else { return }
        let e = replica.committedEpoch
        guard e != .none, let cap = captured[e] else { return }
        if digest(replica.memory) != cap.memoryDigest || digest(replica.committedDeviceState) != cap.deviceStateDigest {
            violate(.s3, "the replica no longer equals epoch \(e) as captured, though nothing newer was committed (a mix of epochs)", onceAs: "s3-mix")
        }
        if let disk = replicaDisk(s), digest(disk.bytes) != cap.diskDigest {
            violate(.s3, "the replica disk no longer equals epoch \(e)'s as captured, though nothing newer was committed (a write applied before its commit)", onceAs: "s3-mix-disk")
        }
    }

    /// The secondary's replica disk, when the guest has one; a missing one is S3 (the replica
    /// could not resume the guest's disk).
    func replicaDisk(_ s: SimSecondaryHost) -> MemoryReplicaDisk? {
        guard config.diskBlocks > 0 else { return nil }
        guard let disk = s.replicaDisk else {
            violate(.s3, "the guest has a disk, the secondary's replica none", onceAs: "s3-no-disk")
            return nil
        }
        return disk
    }

    /// At the takeover: the resumed guest continues from the committed capture and stands
    /// behind every output released so far.
    func checkTakeover(_ s: SimSecondaryHost, _ guest: SimulatedGuest, from: Epoch) {
        if primary != nil && config.arbitration == .none {
            // The old primary still lives: without arbitration, an isolation fault explains it.
            let slack = config.secondary.takeoverAfterNanos + maxDelayToSecondary + 2 * config.heartbeatNanos
            if let last = lastIsolationNanos, now - last <= slack { splitBrainIsKnownGap = true }
        }
        if let cap = captured[from], guest.counter != cap.counter {
            violate(.s3, "resumed counter \(guest.counter) differs from \(cap.counter) captured at epoch \(from)", onceAs: "s3-counter")
        }
        // The resumed guest's disk is the one captured with its memory: the write its RAM
        // records last is there, and nothing written after the checkpoint is.
        if let cap = captured[from], digest(guest.disk) != cap.diskDigest {
            violate(.s3, "the resumed guest's disk differs from its disk as captured at epoch \(from)", onceAs: "s3-disk-resumed")
        }
        if let problem = guest.diskInconsistency() {
            violate(.s3, "the resumed guest's disk disagrees with its memory: \(problem)", onceAs: "s3-disk-memory")
        }
        // Output that left through an acknowledged epoch must all be in the resumed history:
        // strictly, always. Output a primary released after declaring the VM unprotected is
        // excused only when an isolation fault let the secondary take over behind its back
        // (no arbitration yet: the primary cannot know the secondary still might).
        let history = Dictionary(guest.recentOutputs().map { ($0.sequence, $0.counter) }, uniquingKeysWith: { a, _ in a })
        for held in [true, false] {
            let packets = zip(observer.released, observer.releasedHeld).filter { $0.1 == held }.map(\.0)
            func report(_ promise: Promise, _ message: String, key: String) {
                if !held && splitBrainIsKnownGap {
                    knownGap(promise, message + " (released while the primary called the VM unprotected)", onceAs: key)
                } else {
                    violate(promise, message, onceAs: key)
                }
            }
            let lastReleased = packets.map(\.counter).max() ?? 0
            if guest.counter < lastReleased {
                report(.resumedCounter, "the resumed guest's counter \(guest.counter) is below \(lastReleased), that of the last released output", key: "counter-\(held)")
            }
            let verdict = ReleasedOutputCheck.judge(packets, outputSequence: guest.outputSequence, history: history)
            if let p = verdict.beyond.first {
                report(.s2, "output #\(p.sequence) was released, but the resumed guest has only produced up to #\(guest.outputSequence)", key: "s2-beyond-\(held)")
            } else if let p = verdict.mismatched.first {
                report(.s2, "output #\(p.sequence) was released with counter \(p.counter); the resumed guest's history says \(history[p.sequence]!)", key: "s2-history-\(held)")
            }
        }
    }

    /// Where L1's clock starts: at the loss, or with a witness, once the secondary can hold it
    /// (`SimulatedWitness.secondaryCanHoldTheWitness`; until then no takeover is due: nil).
    func l1ClockStart(_ lost: UInt64) -> UInt64? {
        guard config.arbitration != .none else { return lost }
        return secondaryWithWitnessSinceNanos.map { max($0, lost) }
    }

    var maxDelayToSecondary: UInt64 {
        let f = toSecondary.faults
        // A reordered frame is held back up to 5 ms more.
        return max(f.delayMinNanos, f.delayMaxNanos) + (f.reorderPerMillion > 0 ? 5_000_000 : 0) + 1_000_000
    }

    /// A full epoch on the wire: every page raw with its record, the device state, the whole
    /// disk in block records, and framing.
    var maxEpochWireBytes: Int {
        let pages = primaryPageCount
        let diskBytes = config.diskBlocks * (SimulatedGuest.diskBlockSize + 2 * DiskWrite.headerSize)
        let frames = (pages * GuestPage.size + diskBytes) / config.maxFramePayload + 64
        return pages * (GuestPage.size + PageRecordHeader.size) + (64 << 10) + diskBytes + frames * FrameHeader.size
    }

    /// The checks that hold at every step.
    func checkAfterStep() {
        // S1: at most one running copy. A primary paused for good by a planned switchover (or
        // stopped) runs nothing; it is gone once its node sees the handover's outcome.
        let primaryRuns = primary.map { !$0.isFrozen && !$0.guest.paused && !$0.guest.stoppedForGood } ?? false
        if primaryRuns && isTakenOver {
            let message = "two running copies: the old primary (generation \(primary!.generation)) runs on after the secondary took over at \(formatMillis(takeoverAtNanos ?? 0).trimmed())"
            if splitBrainIsKnownGap { knownGap(.s1, message, onceAs: "s1") } else { violate(.s1, message, onceAs: "s1") }
        }
        // L1: failover within its bound once the primary is lost.
        if let lost = primaryLostAtNanos, secondaryCouldResumeAtLoss, !isTakenOver, !cannotTakeOverReported,
           let s = secondary, s.incarnation == incarnationAtLoss {
            if primary.map({ !$0.isFrozen }) ?? false {
                // It thawed before the secondary gave up on it: it was never lost for good.
                primaryLostAtNanos = nil
            } else if let from = l1ClockStart(lost) {
                let backlog = readBudget.map { UInt64(config.linkCapacityBytes / max(1, $0)) * config.stepNanos } ?? 0
                var bound = config.secondary.takeoverAfterNanos + maxDelayToSecondary + config.heartbeatNanos + backlog + 2 * config.stepNanos
                if let t = config.arbitration.timings {
                    // The cluster notices, the secondary waits out the loser's stale quorum and
                    // its self-fence, the witness's record arrives.
                    bound = max(bound, config.witnessDetectNanos.upperBound + t.takeoverWaitNanos + 2 * config.witnessDeliveryNanos + 2 * config.stepNanos)
                }
                if now - from > bound {
                    violate(.l1, "no takeover \((now - from) / 1_000_000) ms after the primary was lost\(from > lost ? " and the secondary could reach the witness" : "") (bound \(bound / 1_000_000) ms)", onceAs: "l1")
                }
            }
        }
        // Limits: nothing grows without bound.
        if let p = primary, let node = p.node {
            let held = node.port.snapshot.heldBytes
            if held > config.outputLimitBytes + SimulatedNICFrame.size {
                violate(.bounds, "output queue holds \(held) bytes, limit \(config.outputLimitBytes)", onceAs: "bounds-output")
            }
            let sendLimit = (config.primary.maxEpochsInFlight + 1) * maxEpochWireBytes
            if let l = p.link, l.sendQueueBytes > sendLimit {
                violate(.bounds, "primary send queue holds \(l.sendQueueBytes) bytes, over \(sendLimit) (\(config.primary.maxEpochsInFlight + 1) full epochs)", onceAs: "bounds-send")
            }
            if let l = p.link, l.decoder.bufferedBytes > FrameHeader.size + FrameHeader.maxPayloadBytes + config.linkCapacityBytes {
                violate(.bounds, "primary frame decoder buffers \(l.decoder.bufferedBytes) bytes", onceAs: "bounds-decoder-p")
            }
        }
        if let s = secondary, let l = s.link, l.decoder.bufferedBytes > FrameHeader.size + FrameHeader.maxPayloadBytes + config.linkCapacityBytes {
            violate(.bounds, "secondary frame decoder buffers \(l.decoder.bufferedBytes) bytes", onceAs: "bounds-decoder-s")
        }
        for link in [toSecondary, toPrimary] where link.queuedBytes > link.capacityBytes + FrameHeader.size + config.maxFramePayload {
            violate(.bounds, "link \(link.name) holds \(link.queuedBytes) bytes, capacity \(link.capacityBytes)", onceAs: "bounds-\(link.name)")
        }
    }
}
