import Foundation
import GeminusCore
import GeminusReplication

/// Everything a node reports, typed. The agent turns each into a log line (swift-log, at
/// `level`) and, where it has a `name`, one JSON object on the event stream (`--events`); the
/// simulator turns each into a trace line (notable from `.notice` up). Tests match on the
/// cases or on `name`, never on message text.
public enum NodeEvent: Sendable {
    public enum Level: Int, Sendable, Comparable {
        case trace, debug, info, notice, warning, error, critical
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
    }

    // Primary.
    case primaryStarted(vm: String, generation: Generation, resumedFrom: Epoch, pages: Int, peer: String?)
    case runningUnprotected(vm: String, reason: String)
    case connected(peer: String)
    case notProtectingYet(peer: String, reason: String, repeats: Int)
    case linkLost(reason: String)
    case captured(Epoch, full: Bool, counter: UInt64, pages: Int, pauseMicros: UInt64, traced: Bool)
    case finalCaptured(Epoch, counter: UInt64, pauseMicros: UInt64)
    case captureFailed(Epoch, String)
    case transmitted(Epoch, base: Epoch, frames: Int)
    case liveCopied(Epoch, full: Bool, pages: Int, micros: UInt64, round: Int)
    case fullCopyStarted(Epoch, mib: Int)
    /// The operator asked for paused full copies, and this guest's disk can only be copied live.
    case fullCopiesLive(reason: String)
    case fullCopyProgress(text: String, fields: [String: JSONValue])
    case acknowledged(Epoch, traced: Bool)
    case protected(vm: String, epoch: Epoch)
    case unprotected(vm: String, reason: String)
    case releasedAll(vm: String, packets: Int)
    case peerLost(reason: String, holdMillis: UInt64)
    case resyncing(after: Epoch, RejectReason)
    /// The secondary holds `Epoch` of this generation from an earlier run of this agent.
    case continuesAfter(Epoch, generation: Generation)
    /// An ordinary stop handed the VM to the secondary (`PrimaryNode.stopForSecondary`).
    case stoppedForSecondary(vm: String, Epoch, reason: String, droppedPackets: Int, guestStopped: Bool)
    case epochDeferred(inFlight: Int, count: Int)
    case staleAck(Epoch, Generation, ours: Generation)
    case outputStalled(vm: String, limitBytes: Int, times: Int)
    case resumeFailed(vm: String, String)
    case announceUnprotected(generation: Generation, after: Epoch)
    case switchoverRequested
    case switchoverRefused(String)
    case switchoverAborted(vm: String, String)
    case handoverSent(vm: String, Epoch)
    case handedOver(vm: String, Epoch, confirmedGeneration: Generation?, pausedMicros: UInt64)
    case selfFenced(vm: String, generation: Generation, reason: String, droppedPackets: Int, stopMicros: UInt64, guestStopped: Bool)

    // Secondary.
    case listening(vm: String, host: String, port: Int)
    case primaryConnected(peer: String, generation: Generation, pages: UInt64)
    case primaryRefused(peer: String, generation: Generation, pairGeneration: Generation)
    case replicaUnavailable(pages: UInt64, String)
    case committed(Epoch, pages: Int, full: Bool)
    case liveCommitted(Epoch, pages: Int, full: Bool)
    case rejected(Epoch, RejectReason, detail: String, keeps: Epoch)
    case handoverRequested(vm: String, Epoch)
    case handoverDeclined(Epoch, reason: String)
    /// The primary's side of a decline under a witness: its stop notice was out, so it stops.
    case handoverDeclinedAfterStopNotice(vm: String, Epoch, reason: String)
    case primaryLost(reason: String, takeoverAfterMillis: UInt64, arbitrated: Bool)
    case primaryBack
    case cannotTakeOver(vm: String, reason: String)
    case awaitingArbitration(vm: String, reason: String)
    case tookOver(vm: String, from: Epoch, generation: Generation, planned: Bool, resumeMicros: UInt64, counter: UInt64?)
    case resumeFailedDown(String)
    /// A primary began an epoch at or below the one committed here (refused with a nack).
    case staleEpoch(Epoch, holds: Epoch, generation: Generation)
    case standbyDown(vm: String, reason: String)
    /// The primary said on the link that it stopped its guest for good (`FrameKind.primaryStopped`).
    case primarySaysStopped(Epoch, reason: String, arbitrated: Bool)
    case standbyBack(vm: String)

    // Both.
    case witnessView(WitnessView)
    case failed(String)

    public var level: Level {
        switch self {
        case .captured(_, let full, _, _, _, _): return full ? .notice : .trace
        case .transmitted, .acknowledged, .epochDeferred, .liveCommitted: return .trace
        case .liveCopied, .staleEpoch: return .info
        case .continuesAfter, .standbyBack: return .notice
        case .standbyDown: return .error
        case .primarySaysStopped: return .warning
        case .stoppedForSecondary(_, _, _, _, let stopped): return stopped ? .warning : .critical
        case .committed(_, _, let full): return full ? .notice : .trace
        case .primaryStarted, .connected, .primaryConnected, .listening, .witnessView, .primaryBack, .fullCopyProgress: return .notice
        case .fullCopyStarted, .switchoverRequested, .protected, .handoverSent, .handoverRequested: return .notice
        case .fullCopiesLive: return .warning
        case .finalCaptured: return .notice
        case .runningUnprotected, .notProtectingYet, .linkLost, .unprotected, .releasedAll, .peerLost, .resyncing,
             .staleAck, .switchoverRefused, .switchoverAborted, .primaryRefused, .rejected, .handoverDeclined, .handoverDeclinedAfterStopNotice,
             .primaryLost, .awaitingArbitration, .announceUnprotected: return .warning
        case .outputStalled: return .notice
        case .handedOver(_, _, let g, _): return g == nil ? .warning : .notice
        case .tookOver: return .notice
        case .replicaUnavailable, .cannotTakeOver: return .error
        case .captureFailed, .resumeFailed, .selfFenced, .resumeFailedDown, .failed: return .critical
        }
    }

    /// The event's name on the JSON stream; nil for what only the log says.
    public var name: EventName? {
        switch self {
        case .primaryStarted: return .primaryStarted
        case .runningUnprotected, .unprotected: return .unprotected
        case .connected, .primaryConnected: return .connected
        case .linkLost: return .linkLost
        case .captured(_, _, _, _, _, let traced): return traced ? .checkpoint : nil
        case .finalCaptured: return .finalCheckpoint
        case .captureFailed, .resumeFailed, .resumeFailedDown, .failed: return .error
        case .fullCopyProgress: return .fullSyncProgress
        case .acknowledged(_, let traced): return traced ? .acknowledged : nil
        case .protected: return .protected
        case .peerLost: return .peerLost
        case .resyncing: return .resync
        case .announceUnprotected: return .announceUnprotected
        case .switchoverRequested: return .switchoverRequested
        case .switchoverRefused: return .switchoverRefused
        case .switchoverAborted: return .switchoverAborted
        case .handoverSent: return .handoverSent
        case .handedOver: return .handedOver
        case .selfFenced: return .selfFenced
        case .listening: return .listening
        case .rejected: return .rejected
        case .committed(_, _, let full): return full ? .baseCommitted : nil
        case .handoverRequested: return .handoverRequested
        case .handoverDeclined, .handoverDeclinedAfterStopNotice: return .handoverDeclined
        case .primaryLost: return .primaryLost
        case .cannotTakeOver: return .cannotTakeOver
        case .awaitingArbitration: return .awaitingArbitration
        case .witnessView: return .witnessView
        case .liveCopied: return .liveCopy
        case .liveCommitted: return nil
        case .continuesAfter: return .resync
        case .primarySaysStopped: return .primaryLost
        case .stoppedForSecondary: return .primaryStopped
        case .standbyDown: return .standbyDown
        case .standbyBack: return .standbyBack
        case .staleEpoch: return nil
        case .notProtectingYet, .transmitted, .fullCopyStarted, .fullCopiesLive, .releasedAll, .epochDeferred, .staleAck, .outputStalled,
             .primaryRefused, .replicaUnavailable, .primaryBack, .tookOver: return nil
        }
    }

    /// The JSON payload (without `event`, `role` and `timeMicros`, which the stream adds).
    public var fields: [String: JSONValue] {
        switch self {
        case .primaryStarted(let vm, let g, let from, let pages, let peer):
            return ["vm": .string(vm), "generation": .int(g.rawValue), "resumedFrom": .int(from.rawValue), "pages": .int(pages),
                    "peer": peer.map(JSONValue.string) ?? .null]
        case .runningUnprotected(_, let reason), .unprotected(_, let reason): return ["reason": .string(reason)]
        case .connected(let peer): return ["peer": .string(peer)]
        case .primaryConnected(let peer, let g, _): return ["peer": .string(peer), "generation": .int(g.rawValue)]
        case .linkLost(let reason): return ["reason": .string(reason)]
        case .captured(let e, let full, let counter, _, _, _): return ["epoch": .int(e.rawValue), "counter": .int(counter), "full": .bool(full)]
        case .liveCopied(let e, let full, let pages, let micros, let round):
            return ["epoch": .int(e.rawValue), "full": .bool(full), "pages": .int(pages), "micros": .int(micros), "round": .int(round)]
        case .liveCommitted(let e, let pages, _): return ["epoch": .int(e.rawValue), "pages": .int(pages)]
        case .finalCaptured(let e, let counter, let pause):
            return ["epoch": .int(e.rawValue), "counter": .int(counter), "pauseMicros": .int(pause)]
        case .captureFailed(_, let m), .resumeFailed(_, let m), .resumeFailedDown(let m), .failed(let m): return ["message": .string(m)]
        case .fullCopyProgress(_, let f): return f
        case .acknowledged(let e, _), .protected(_, let e), .handoverSent(_, let e), .handoverRequested(_, let e): return ["epoch": .int(e.rawValue)]
        case .peerLost(let reason, _): return ["reason": .string(reason)]
        case .resyncing(let e, let r): return ["epoch": .int(e.rawValue), "reason": .string(r.description)]
        case .continuesAfter(let e, _): return ["epoch": .int(e.rawValue), "reason": .string("secondary-holds-newer")]
        case .standbyDown(_, let r): return ["reason": .string(r)]
        case .primarySaysStopped(let e, let r, _): return ["reason": .string(r), "epoch": .int(e.rawValue), "primaryStopped": .bool(true)]
        case .stoppedForSecondary(_, let e, let r, let dropped, let stopped):
            return ["epoch": .int(e.rawValue), "reason": .string(r), "droppedPackets": .int(dropped), "guestStopped": .bool(stopped)]
        case .announceUnprotected(let g, let after): return ["generation": .int(g.rawValue), "after": .int(after.rawValue)]
        case .switchoverRefused(let r), .switchoverAborted(_, let r): return ["reason": .string(r)]
        case .handedOver(_, let e, let g, let paused):
            return ["epoch": .int(e.rawValue), "pausedMicros": .int(paused), "generation": g.map { .int($0.rawValue) } ?? .null]
        case .selfFenced(_, _, let reason, let dropped, let micros, let stopped):
            return ["reason": .string(reason), "droppedPackets": .int(dropped), "stopMicros": .int(micros), "guestStopped": .bool(stopped)]
        case .listening(let vm, let host, let port): return ["vm": .string(vm), "host": .string(host), "port": .int(port)]
        case .rejected(let e, let r, let detail, _): return ["epoch": .int(e.rawValue), "reason": .string(r.description), "detail": .string(detail)]
        case .committed(let e, let pages, _): return ["epoch": .int(e.rawValue), "pages": .int(pages)]
        case .handoverDeclined(let e, let reason), .handoverDeclinedAfterStopNotice(_, let e, let reason):
            return ["epoch": .int(e.rawValue), "reason": .string(reason)]
        case .primaryLost(let reason, _, _), .cannotTakeOver(_, let reason), .awaitingArbitration(_, let reason): return ["reason": .string(reason)]
        case .witnessView(let v):
            return ["quorate": .bool(v.quorate), "peerPresent": .bool(v.peerPresent), "witnessHeard": .bool(v.witnessHeard),
                    "stoppedGeneration": v.stoppedGeneration.map { .int($0.rawValue) } ?? .null]
        default: return [:]
        }
    }

    /// What a person reads in the log (and the simulator's trace).
    public var message: String {
        switch self {
        case .primaryStarted(let vm, let g, let from, let pages, let peer):
            return "primary of \(vm) started as generation \(g) (\((pages * GuestPage.size) >> 20) MiB\(from == .none ? "" : ", resumed from checkpoint \(from)")), secondary \(peer ?? "none")"
        case .runningUnprotected(let vm, let reason): return "\(vm) runs UNPROTECTED: \(reason)"
        case .connected(let peer): return "connected to secondary \(peer); starting full checkpoint"
        case .notProtectingYet(let peer, let reason, let repeats):
            return "not protecting on \(peer) yet: \(reason)\(repeats > 0 ? " (\(repeats) more since)" : "")"
        case .linkLost(let reason): return "link lost: \(reason)"
        case .captured(let e, let full, let counter, let pages, _, _): return "capture \(e)\(full ? " full" : "") (counter \(counter), \(pages) pages)"
        case .finalCaptured(let e, let counter, let pause): return "final capture \(e) (counter \(counter), guest paused \(pause) us so far)"
        case .captureFailed(let e, let m): return "checkpoint \(e) failed: \(m); stopping"
        case .transmitted(let e, let base, let frames): return "send \(e) on \(base) (\(frames) frames)"
        case .liveCopied(let e, let full, let pages, let micros, let round):
            return "live copy round \(round) (epoch \(e)): \(full ? "all " : "")\(pages) pages copied while the guest ran, in \(micros / 1000) ms"
        case .liveCommitted(let e, let pages, _): return "live round \(e) applied (\(pages) pages; not resumable until the pause that ends the copy commits)"
        case .fullCopyStarted(let e, let mib): return "full checkpoint \(e): sending \(mib) MiB of guest RAM to the secondary"
        case .fullCopiesLive(let reason): return "--first-copy paused is overridden: every full copy is taken while the guest runs (\(reason))"
        case .fullCopyProgress(let text, _): return text
        case .acknowledged(let e, _): return "ack \(e)"
        case .protected(let vm, let e): return "\(vm) is PROTECTED: secondary acknowledged full checkpoint \(e)"
        case .unprotected(let vm, let reason): return "\(vm) is UNPROTECTED: \(reason); held output released"
        case .releasedAll(let vm, let n): return "\(vm) is UNPROTECTED; released \(n) held packets"
        case .peerLost(let reason, let hold): return "secondary lost (\(reason)); holding output for up to \(hold) ms"
        case .resyncing(let e, let r): return "secondary refused epoch \(e) (\(r)); sending a full checkpoint"
        case .continuesAfter(let e, let g):
            return "the secondary holds epoch \(e), numbered by an earlier run of this primary: generation \(g) numbers on after it, with a full checkpoint"
        case .primarySaysStopped(let e, let r, let arbitrated):
            return "the primary stopped its guest for good after checkpoint \(e) (\(r)): taking over without waiting out a silence\(arbitrated ? ", once the witness has the primary's stop notice" : "")"
        case .stoppedForSecondary(let vm, let e, let r, let dropped, let stopped):
            return stopped
                ? "STOPPED \(vm) here (\(r)): the guest is stopped for good, \(dropped) held packets dropped, and the secondary told to take over from checkpoint \(e)"
                : "STOPPED \(vm) here (\(r)), but the guest could not be confirmed stopped, so the secondary was not told to take over: check this host (is the guest still running?) and stop it by hand"
        case .staleEpoch(let e, let holds, let g):
            return "refused epoch \(e) of generation \(g): epoch \(holds) is held here already (a restarted primary, or a duplicate); the nack tells the primary where to continue"
        case .standbyDown(let vm, let r):
            return "the standby of \(vm) reports \(r): it could not take over, so the primary is let go (it runs unprotected) and dials are refused until the standby answers again"
        case .standbyBack(let vm): return "the standby of \(vm) answers again: the primary may connect and resynchronise"
        case .epochDeferred(let n, _): return "epoch deferred: \(n) epochs in flight (backpressure)"
        case .staleAck(let e, let g, let ours): return "ignored an acknowledgement of epoch \(e) from generation \(g) (this pair is at \(ours))"
        case .outputStalled(let vm, let limit, let times):
            return "\(vm)'s output buffer is full (\(limit) bytes awaiting acknowledgement): the guest waits paused until the secondary catches up (\(times) times so far)"
        case .resumeFailed(let vm, let m): return "cannot resume \(vm): \(m); stopping"
        case .announceUnprotected(let g, let after):
            return "secondary still lost: asking the witness to record generation \(g) as unprotected after epoch \(after) before releasing held output"
        case .switchoverRequested: return "planned switchover requested"
        case .switchoverRefused(let r): return "switchover refused: \(r)"
        case .switchoverAborted(let vm, let r): return "switchover called off, \(vm) runs on here: \(r)"
        case .handoverSent(let vm, let e): return "secondary acknowledged the final checkpoint \(e); handing \(vm) over"
        case .handedOver(let vm, let e, let g, let paused):
            if let g { return "HANDED OVER \(vm) at checkpoint \(e): the secondary runs it as generation \(g) (guest paused \(paused / 1000) ms)" }
            return "handed over \(vm) at checkpoint \(e) but the secondary's confirmation was lost with the link; it takes over on its own once it notices the silence. This copy is stopped."
        case .selfFenced(let vm, let g, let reason, let dropped, let micros, let stopped):
            return "SELF-FENCED \(vm) (generation \(g)): \(reason). The guest is stopped for good (in \(micros / 1000) ms) and \(dropped) held packets were dropped"
                + (stopped ? "; the secondary may run it now" : "; the guest could not be confirmed stopped, so the witness is not told: check this host (QEMU still running?) and stop the guest by hand")
        case .listening(let vm, let host, let port): return "waiting for the primary of \(vm) on \(host):\(port)"
        case .primaryConnected(let peer, let g, let pages): return "accepts the primary \(peer) (generation \(g), \(pages) pages)"
        case .primaryRefused(let peer, let g, let pair): return "refused primary \(peer): generation \(g) is older than the pair's \(pair)"
        case .replicaUnavailable(let pages, let m): return "cannot hold a replica of \(pages) pages: \(m)"
        case .committed(let e, let pages, let full):
            return full ? "full checkpoint \(e) committed (\(pages) pages); the standby can take over from now on" : "commit \(e)"
        case .rejected(let e, let r, let detail, let keeps): return "rejected epoch \(e) (\(r)): \(detail); the last committed checkpoint \(keeps) stays"
        case .handoverRequested(let vm, let e): return "the primary hands \(vm) over at checkpoint \(e)"
        case .handoverDeclined(let e, let reason): return "declined the handover at checkpoint \(e): \(reason)"
        case .handoverDeclinedAfterStopNotice(let vm, let e, let reason):
            return "the secondary declined the handover of \(vm) at checkpoint \(e) (\(reason)), but this primary's stop notice is already with the witness, which makes it final: the guest is stopped here for good, and the secondary resumes checkpoint \(e) as soon as its witness view shows the notice"
        case .primaryLost(let reason, let after, let arbitrated):
            return "primary lost: \(reason); taking over after \(after) ms of silence unless it returns\(arbitrated ? ", and only once the witness gives this node the VM" : "")"
        case .primaryBack: return "primary is back"
        case .cannotTakeOver(let vm, let reason): return "CANNOT TAKE OVER \(vm): \(reason)"
        case .awaitingArbitration(let vm, let reason): return "primary silent, not taking over \(vm) yet: \(reason)"
        case .tookOver(let vm, let from, let g, let planned, let micros, let counter):
            return "TOOK OVER \(vm) from checkpoint \(from) as generation \(g)\(planned ? " (planned switchover)" : "") (resume \(micros) us\(counter.map { ", counter \($0)" } ?? ""))"
        case .resumeFailedDown(let m): return "resuming the standby failed: \(m); the VM is DOWN"
        case .witnessView(let v): return "witness view: \(v)"
        case .failed(let m): return m
        }
    }
}

/// The names of the events on the JSON stream (`--events`): what scripts, the demo and the
/// tests wait for. One place, so a renamed event is a compile error, not a silent mismatch.
public enum EventName: String, CaseIterable, Sendable, Codable {
    case acknowledged = "acknowledged"
    case announceUnprotected = "announce-unprotected"
    case arbitration = "arbitration"
    case awaitingArbitration = "awaiting-arbitration"
    case baseCommitted = "base-committed"
    case cannotTakeOver = "cannot-take-over"
    case checkpoint = "checkpoint"
    case connected = "connected"
    case error = "error"
    case finalCheckpoint = "final-checkpoint"
    case fullSyncProgress = "full-sync-progress"
    case guestStarted = "guest-started"
    case handedOver = "handed-over"
    case handoverDeclined = "handover-declined"
    case handoverRequested = "handover-requested"
    case handoverSent = "handover-sent"
    case linkLost = "link-lost"
    case listening = "listening"
    case peerLost = "peer-lost"
    case primaryLost = "primary-lost"
    case primaryStarted = "primary-started"
    case progress = "progress"
    case protected = "protected"
    case primaryStopped = "primary-stopped"
    case standbyDown = "standby-down"
    case standbyBack = "standby-back"
    case rejected = "rejected"
    case resync = "resync"
    case selfFenced = "self-fenced"
    case switchoverAborted = "switchover-aborted"
    case switchoverRefused = "switchover-refused"
    case switchoverRequested = "switchover-requested"
    case tookOver = "took-over"
    case trackingMiss = "tracking-miss"
    case unprotected = "unprotected"
    case witnessView = "witness-view"
    case liveCopy = "live-copy"
}
