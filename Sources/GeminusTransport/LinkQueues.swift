import GeminusCore

/// Frames waiting for the writer thread. Bounded in bytes: `enqueue` blocks while the queue is
/// full, so a slow peer slows the sender down instead of growing memory.
final class OutboundQueue: @unchecked Sendable {
    enum EnqueueResult { case queued, timedOut, closed }

    struct Batch {
        var frames: [[UInt8]]
        var bytes: Int
    }

    private let condition = MonotonicCondition()
    private let limitBytes: Int
    private var frames = Fifo<[UInt8]>()
    /// Queued plus being written: bytes only leave the count once the kernel has them.
    private var queuedBytes = 0
    private var sendWaits: UInt64 = 0
    private var closed = false

    init(limitBytes: Int) {
        self.limitBytes = max(1, limitBytes)
    }

    func enqueue(_ frame: [UInt8], deadlineNanos: UInt64) -> EnqueueResult {
        condition.lock()
        defer { condition.unlock() }
        var waited = false
        // An empty queue takes any frame, so one frame larger than the limit cannot block forever.
        while !closed && queuedBytes > 0 && queuedBytes + frame.count > limitBytes {
            if Monotonic.nanos() >= deadlineNanos { return .timedOut }
            if !waited {
                waited = true
                sendWaits += 1
            }
            condition.wait(untilNanos: deadlineNanos)
        }
        if closed { return .closed }
        frames.push(frame)
        queuedBytes += frame.count
        condition.broadcast()
        return .queued
    }

    /// The next frames to write, at most `maxFrames` and about `maxBytes`; an empty batch when
    /// nothing was queued by `heartbeatDueNanos` (time for a heartbeat); nil once closed.
    func nextBatch(heartbeatDueNanos: UInt64, maxFrames: Int, maxBytes: Int) -> Batch? {
        condition.lock()
        defer { condition.unlock() }
        while !closed && frames.isEmpty {
            if Monotonic.nanos() >= heartbeatDueNanos { return Batch(frames: [], bytes: 0) }
            condition.wait(untilNanos: heartbeatDueNanos)
        }
        if closed { return nil }
        var batch = Batch(frames: [], bytes: 0)
        batch.frames.reserveCapacity(min(maxFrames, frames.count))
        while batch.frames.count < maxFrames, batch.bytes < maxBytes, let f = frames.pop() {
            batch.bytes += f.count
            batch.frames.append(f)
        }
        return batch
    }

    func written(_ bytes: Int) {
        condition.withLock {
            // After close() the count was already zeroed with the dropped frames.
            if !closed { queuedBytes -= bytes }
            condition.broadcast()
        }
    }

    /// Waits until everything queued has been handed to the kernel; false on timeout or close.
    func waitUntilEmpty(deadlineNanos: UInt64) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while queuedBytes > 0 {
            if closed || Monotonic.nanos() >= deadlineNanos { return false }
            condition.wait(untilNanos: deadlineNanos)
        }
        return true
    }

    func close() {
        condition.withLock {
            closed = true
            frames.removeAll()
            queuedBytes = 0
            condition.broadcast()
        }
    }

    var counters: (queuedBytes: Int, sendWaits: UInt64) {
        condition.withLock { (queuedBytes, sendWaits) }
    }
}

/// Decoded frames waiting for `receive`. Bounded in bytes: when full, the reader thread stops
/// reading the socket, the kernel's receive buffer fills, and TCP pushes back on the peer.
final class InboundQueue: @unchecked Sendable {
    enum PopResult { case frame(Frame), timedOut, closed }

    private let condition = MonotonicCondition()
    private let limitBytes: Int
    private var frames = Fifo<Frame>()
    private var queuedBytes = 0
    private var closed = false

    init(limitBytes: Int) {
        self.limitBytes = max(1, limitBytes)
    }

    private static func size(_ f: Frame) -> Int { FrameHeader.size + f.payload.count }

    /// Blocks while the queue is full; false once closed (the frame is dropped).
    func push(_ frame: Frame) -> Bool {
        let size = Self.size(frame)
        condition.lock()
        defer { condition.unlock() }
        while !closed && queuedBytes > 0 && queuedBytes + size > limitBytes {
            condition.wait(untilNanos: .max)
        }
        if closed { return false }
        frames.push(frame)
        queuedBytes += size
        condition.broadcast()
        return true
    }

    /// Frames that arrived before the connection closed are still handed out; `.closed` only
    /// once they are all gone.
    func pop(deadlineNanos: UInt64) -> PopResult {
        condition.lock()
        defer { condition.unlock() }
        while frames.isEmpty {
            if closed { return .closed }
            if Monotonic.nanos() >= deadlineNanos { return .timedOut }
            condition.wait(untilNanos: deadlineNanos)
        }
        let f = frames.pop()!
        queuedBytes -= Self.size(f)
        condition.broadcast()
        return .frame(f)
    }

    /// Wakes and refuses everything waiting. Frames already queued arrived intact and stay
    /// receivable when the peer ended the connection; a local close discards them.
    func close(discarding: Bool) {
        condition.withLock {
            closed = true
            if discarding {
                frames.removeAll()
                queuedBytes = 0
            }
            condition.broadcast()
        }
    }

    var queuedByteCount: Int { condition.withLock { queuedBytes } }
}
