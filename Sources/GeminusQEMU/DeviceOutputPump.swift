import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// Moves what one guest device produced (console lines, NIC frames) from the socket QEMU writes
/// it to into the guest's output port, where it is held until its checkpoint is acknowledged.
///
/// Which epoch a unit belongs to: the port tags it with the epoch open when it is offered. QEMU
/// writes a device's output into the socket while the vCPU runs, so when the guest is paused for
/// a checkpoint everything it produced before is in the socket; `drain()` takes it before the
/// agent opens the next epoch. A unit read later is tagged later, which only holds it longer.
///
/// Bounded: a full port (or no port yet) keeps units waiting here, up to `maxWaitingBytes`
/// (0: one batch); past that the reading stops and the socket fills, and what the device does
/// then is the device's (COM1 stalls the guest; QEMU's NIC backend queues, then drops).
final class DeviceOutputPump: @unchecked Sendable {
    /// Reads what is in the socket now into whole units (lines, frames); empty when there is
    /// nothing. Called under the pump's lock, so it may keep state between calls.
    typealias Reader = (Int32) -> [[UInt8]]
    /// Offers one unit to the port: false when the port is full.
    typealias Offer = (any GuestOutputPort, [UInt8]) -> Bool

    let fd: Int32
    private let lock = NSLock()
    private let read: Reader
    private let offer: Offer
    private var port: (any GuestOutputPort)?
    /// Units the port refused (full): offered again, first, before anything newer.
    private var waiting: [[UInt8]] = []
    private var waitingBytes = 0
    private let maxWaitingBytes: Int
    private var closed = false
    // Counted under the lock by the pump's thread; read from others (status, drain).
    private var _unitsOffered = 0
    private var _waitingCapHits = 0
    var unitsOffered: Int { lock.withLock { _unitsOffered } }
    /// Times the reading stopped because `maxWaitingBytes` were waiting.
    var waitingCapHits: Int { lock.withLock { _waitingCapHits } }

    /// Takes over `fd` (closed with the pump) and starts the thread that moves units.
    init(fd: Int32, threadName: String, maxWaitingBytes: Int = 0, read: @escaping Reader, offer: @escaping Offer) {
        self.fd = fd
        self.maxWaitingBytes = maxWaitingBytes
        self.read = read
        self.offer = offer
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let t = Thread { [weak self] in self?.loop() }
        t.name = threadName
        t.start()
    }

    deinit { close(fd) }

    func attach(_ port: any GuestOutputPort) { lock.withLock { self.port = port } }

    /// Takes everything produced so far. Call while the guest is paused, before the next epoch opens.
    func drain() { lock.withLock { _ = pumpLocked() } }

    /// Whether units wait for room in the port (the guest's output is stalled on it).
    var isStalled: Bool { lock.withLock { !waiting.isEmpty } }

    func stop() {
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

    /// Offers waiting units, then reads and offers until the socket is empty or the port full.
    /// Returns whether anything moved.
    private func pumpLocked() -> Bool {
        guard let port else { return false }
        var moved = false
        while let unit = waiting.first {
            guard offer(port, unit) else { break }
            waiting.removeFirst()
            waitingBytes -= unit.count
            _unitsOffered += 1
            moved = true
        }
        while waitingBytes <= maxWaitingBytes && (waiting.isEmpty || maxWaitingBytes > 0) {
            let units = read(fd)
            guard !units.isEmpty else { return moved }
            moved = true
            for unit in units {
                if waiting.isEmpty && offer(port, unit) {
                    _unitsOffered += 1
                } else {
                    waiting.append(unit)
                    waitingBytes += unit.count
                }
            }
        }
        if waitingBytes > maxWaitingBytes && maxWaitingBytes > 0 { _waitingCapHits += 1 }
        return moved
    }
}
