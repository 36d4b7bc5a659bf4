#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GeminusCore
import Logging
import Synchronization

/// The machinery behind a `FramedConnection`: the socket, both queues, the reader and writer
/// threads and the counters. The threads hold the link, not the connection, so dropping the
/// last reference to a connection closes it (its deinit) and lets the threads end.
final class Link: @unchecked Sendable {
    /// The writer gathers up to this many frames into one sendmsg; far below IOV_MAX (1024)
    /// because the pointers are pinned by nested closures, one stack frame each.
    static let maxFramesPerWrite = 64
    static let maxBytesPerWrite = 8 << 20

    let socket: Socket
    let remoteAddress: String
    let outbound: OutboundQueue
    let inbound: InboundQueue
    private let heartbeatFrame: [UInt8]
    /// Seals every frame the writer sends, in wire order; the reader's `FrameReader` opens.
    private let sealer: AEADDirection?
    private let opener: AEADDirection?
    private let heartbeatNanos: UInt64
    private let logger: Logger
    private let reason = Mutex<ConnectionClosed?>(nil)

    let bytesSent = Atomic<UInt64>(0)
    let bytesReceived = Atomic<UInt64>(0)
    let framesSent = Atomic<UInt64>(0)
    let framesReceived = Atomic<UInt64>(0)
    let heartbeatsSent = Atomic<UInt64>(0)
    let heartbeatsReceived = Atomic<UInt64>(0)
    let lastHeardNanos: Atomic<UInt64>

    init(socket: Socket, remoteAddress: String, heartbeatGeneration: Generation, keys: SessionKeys,
         options: LinkOptions, logger: Logger) {
        self.socket = socket
        sealer = options.sealFrames ? AEADDirection(key: keys.send, encrypting: true) : nil
        opener = options.sealFrames ? AEADDirection(key: keys.receive, encrypting: false) : nil
        self.remoteAddress = remoteAddress
        self.logger = logger
        outbound = OutboundQueue(limitBytes: options.outboundLimitBytes)
        inbound = InboundQueue(limitBytes: options.inboundLimitBytes)
        heartbeatFrame = FrameCodec.encode(FrameHeader(kind: .heartbeat, generation: heartbeatGeneration, epoch: .none))
        heartbeatNanos = max(1, options.heartbeatInterval.clampedNanos)
        // The handshake just completed: the peer was heard from now.
        lastHeardNanos = Atomic(Monotonic.nanos())
    }

    /// Starts the threads; `reader` holds any bytes that arrived behind the handshake.
    func start(reader: FrameReader) {
        AllocatorTuning.apply()
        reader.maxPayloadBytes = FrameHeader.maxPayloadBytes
        reader.opener = opener
        reader.onReceive = { [unowned self] n in
            bytesReceived.add(UInt64(n), ordering: .relaxed)
        }
        socket.retain()
        socket.retain()
        let readerThread = Thread { [self] in
            readLoop(reader)
            reader.onReceive = nil
            socket.release()
        }
        // Linux keeps 15 characters of a thread name; the address would not fit.
        readerThread.name = "geminus-rx"
        let writerThread = Thread { [self] in
            writeLoop()
            socket.release()
        }
        writerThread.name = "geminus-tx"
        readerThread.start()
        writerThread.start()
    }

    var closeReason: ConnectionClosed? { reason.withLock { $0 } }

    /// The first reason wins: a reader that sees EOF after a local close must not report
    /// "peer closed".
    func close(_ why: ConnectionClosed) {
        let first = reason.withLock { r -> Bool in
            guard r == nil else { return false }
            r = why
            return true
        }
        guard first else { return }
        socket.shutdown()
        outbound.close()
        inbound.close(discarding: why == .closedLocally)
        socket.release()
        if why != .closedLocally {
            logger.debug("connection to \(remoteAddress) closed: \(why)")
        }
    }

    // MARK: Reader

    private func readLoop(_ reader: FrameReader) {
        while true {
            let frame: Frame
            do throws(FrameReader.Failure) {
                frame = try reader.next()
            } catch {
                switch error {
                case .frame(let e): close(.frameError(e))
                case .endOfStream: close(.peerClosed)
                case .socket(let e): close(.socketError(e))
                case .timedOut: close(.socketError(ETIMEDOUT))
                }
                return
            }
            // Only an authenticated frame says the peer is alive: injected bytes must not
            // hold off a takeover (a frame must therefore cross the link within the
            // silence bound: 4 MiB, the largest, takes 34 ms at 1 Gb/s).
            lastHeardNanos.store(Monotonic.nanos(), ordering: .relaxed)
            guard deliver(frame) else { return }
        }
    }

    /// Heartbeats end here; anything else waits in the inbound queue (blocking while it is full).
    private func deliver(_ frame: Frame) -> Bool {
        if frame.kind == .heartbeat {
            heartbeatsReceived.add(1, ordering: .relaxed)
            return true
        }
        guard inbound.push(frame) else { return false }
        framesReceived.add(1, ordering: .relaxed)
        return true
    }

    // MARK: Writer

    private func writeLoop() {
        var lastSentNanos = Monotonic.nanos()
        while true {
            let due = lastSentNanos &+ heartbeatNanos
            guard var batch = outbound.nextBatch(heartbeatDueNanos: due < lastSentNanos ? .max : due,
                                                 maxFrames: Self.maxFramesPerWrite, maxBytes: Self.maxBytesPerWrite)
            else { return }
            let isHeartbeat = batch.frames.isEmpty
            if isHeartbeat { batch.frames = [heartbeatFrame] }
            let pieces = sealInWireOrder(&batch.frames)
            let total = pieces.reduce(0) { $0 + $1.count }
            let failure = Self.withIOVecs(pieces[...]) { vecs in writeAll(&vecs) }
            if let failure {
                close(failure == EPIPE || failure == ECONNRESET ? .peerClosed : .socketError(failure))
                return
            }
            lastSentNanos = Monotonic.nanos()
            bytesSent.add(UInt64(total), ordering: .relaxed)
            if isHeartbeat {
                heartbeatsSent.add(1, ordering: .relaxed)
            } else {
                framesSent.add(UInt64(batch.frames.count), ordering: .relaxed)
                outbound.written(batch.bytes)
            }
        }
    }

    /// Seals each frame in place (the queue gave up its reference, so no copy is made) and
    /// interleaves the tags: frame, tag, frame, tag. Sealing here, on the one writer thread,
    /// is what makes the frame counter follow the order on the wire.
    private func sealInWireOrder(_ frames: inout [[UInt8]]) -> [[UInt8]] {
        guard let sealer else { return frames }
        var pieces: [[UInt8]] = []
        pieces.reserveCapacity(frames.count * 2)
        for i in frames.indices {
            let tag = FrameSeal.seal(&frames[i], with: sealer)
            pieces.append(frames[i])
            pieces.append(tag)
        }
        return pieces
    }

    /// Gives `body` one iovec per frame. The arrays' storage is only pinned inside
    /// `withUnsafeBytes`, so each frame adds one nested closure.
    private static func withIOVecs<R>(_ frames: ArraySlice<[UInt8]>, _ body: (inout [iovec]) -> R) -> R {
        var vecs: [iovec] = []
        vecs.reserveCapacity(frames.count)
        return pin(frames, &vecs, body)
    }

    private static func pin<R>(_ frames: ArraySlice<[UInt8]>, _ vecs: inout [iovec], _ body: (inout [iovec]) -> R) -> R {
        guard let first = frames.first else { return body(&vecs) }
        return first.withUnsafeBytes { raw in
            if raw.count > 0 {
                vecs.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count))
            }
            return pin(frames.dropFirst(), &vecs, body)
        }
    }

    /// Writes every byte the iovecs describe; the errno on failure, nil on success.
    private func writeAll(_ vecs: inout [iovec]) -> Int32? {
        var index = 0
        while index < vecs.count {
            let n = vecs.withUnsafeMutableBufferPointer { v -> Int in
                var msg = msghdr()
                msg.msg_iov = v.baseAddress! + index
                msg.msg_iovlen = v.count - index
                return sendmsg(socket.fd, &msg, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            var left = n
            while left > 0 && index < vecs.count {
                if left >= vecs[index].iov_len {
                    left -= vecs[index].iov_len
                    index += 1
                } else {
                    vecs[index].iov_base += left
                    vecs[index].iov_len -= left
                    left = 0
                }
            }
        }
        return nil
    }
}
