import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// The guest's serial console as output the agent commits like network packets: QEMU's COM1 is
/// a unix-socket chardev (server side, `QEMUGuestConfig.serialSocketPath`; every byte also goes
/// to the serial log) and this end reads it, one packet per console line, into the guest's
/// `GuestOutputPort`. Held there until the checkpoint that produced it is acknowledged.
///
/// Which epoch a line belongs to: the port tags it with the epoch open when it is offered.
/// The vCPU writes COM1 synchronously into the socket, so when the guest is paused for a
/// checkpoint everything it printed before is in the socket; `drain()` takes it before the
/// agent opens the next epoch. A line read later is tagged later, which only holds it longer.
/// A line not yet ended stays here until it is.
///
/// Bounded: a full port (or no port yet) stops the reading; the socket fills, and COM1 stalls
/// the guest rather than lose a byte. Lines longer than `maxLineBytes` are cut into packets.
public final class SerialOutput: @unchecked Sendable {
    public static let maxLineBytes = 4096
    private let fd: Int32
    private let lock = NSLock()
    private var port: (any GuestOutputPort)?
    private var partial: [UInt8] = []
    /// Whole lines the port refused (full): offered again, first, before anything newer.
    private var waiting: [[UInt8]] = []
    private var closed = false
    private var thread: Thread?
    /// Read into by `pumpLocked`, under the lock: the loop runs every few milliseconds.
    private var buffer = [UInt8](repeating: 0, count: 16384)
    public private(set) var linesOffered = 0

    /// Connects to QEMU's serial socket (QEMU listens once it runs; retried up to `timeout`).
    public init(socketPath: String, timeout: Double = 10) throws(GeminusError) {
        fd = try UnixSocket.connect(path: socketPath, timeout: timeout, what: "QEMU's serial socket")
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let t = Thread { [weak self] in self?.loop() }
        t.name = "geminus-serial-output"
        thread = t
        t.start()
    }

    deinit { close(fd) }

    /// Where lines go from now on (the primary's port; a resumed standby's new one).
    public func attach(_ port: any GuestOutputPort) {
        lock.withLock { self.port = port }
    }

    /// Takes everything the guest printed so far. Call while it is paused, before the next
    /// epoch opens.
    public func drain() {
        lock.withLock { _ = pumpLocked() }
    }

    public func stop() {
        lock.withLock { closed = true }
        shutdown(fd, Int32(SHUT_RDWR))
    }

    private func loop() {
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, 5)
            let more: Bool = lock.withLock { closed ? false : pumpLocked() }
            if lock.withLock({ closed }) { return }
            // Nothing moved (no port, a full port, or no data): wait a little before trying again.
            if !more { Monotonic.sleep(nanos: 1_000_000) }
        }
    }

    /// Offers waiting lines, then reads and offers until the socket is empty or the port full.
    /// Returns whether anything moved.
    private func pumpLocked() -> Bool {
        guard let port else { return false }
        var moved = false
        while let line = waiting.first {
            guard port.offer(line) else { return moved }
            waiting.removeFirst()
            linesOffered += 1
            moved = true
        }
        while waiting.isEmpty {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { break }
            moved = true
            for byte in buffer[0..<n] {
                partial.append(byte)
                if byte == 10 || partial.count >= Self.maxLineBytes {
                    let line = partial
                    partial = []
                    if waiting.isEmpty && port.offer(line) { linesOffered += 1 } else { waiting.append(line) }
                }
            }
        }
        return moved
    }
}
