import Foundation
import GeminusCore
import GeminusHypervisor
#if canImport(Glibc)
import Glibc
#endif

/// The guest's serial console as output the agent commits like network packets: QEMU's COM1 is
/// a unix-socket chardev (server side, `QEMUGuestConfig.serialSocketPath`; every byte also goes
/// to the serial log) and this end reads it, one packet per console line, into the guest's
/// `GuestOutputPort` (`DeviceOutputPump`: epochs, drain at pause, bounds). A line not yet ended
/// stays here until it is; lines longer than `maxLineBytes` are cut into packets. When the port
/// is full the socket fills and COM1 stalls the guest rather than lose a byte.
public final class SerialOutput: @unchecked Sendable {
    public static let maxLineBytes = 4096
    private let pump: DeviceOutputPump

    /// Connects to QEMU's serial socket (QEMU listens once it runs; retried up to `timeout`),
    /// served by `peer` (the QEMU the agent started): its lines become the guest's output.
    public init(socketPath: String, timeout: Double = 10, peer: SocketPeer = .sameUser) throws(GeminusError) {
        let fd = try UnixSocket.connect(path: socketPath, timeout: timeout, what: "QEMU's serial socket", peer: peer)
        // Under the pump's lock: one buffer for the reads, and the line not yet ended.
        var buffer = [UInt8](repeating: 0, count: 16384)
        var partial: [UInt8] = []
        pump = DeviceOutputPump(fd: fd, threadName: "geminus-serial-output", read: { fd in
            var lines: [[UInt8]] = []
            while true {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                guard n > 0 else { return lines }
                for byte in buffer[0..<n] {
                    partial.append(byte)
                    if byte == 10 || partial.count >= SerialOutput.maxLineBytes {
                        lines.append(partial)
                        partial = []
                    }
                }
                if !lines.isEmpty { return lines }
            }
        }, offer: { port, line in port.offer(line) })
    }

    public var linesOffered: Int { pump.unitsOffered }
    /// Where lines go from now on (the primary's port; a resumed standby's new one).
    public func attach(_ port: any GuestOutputPort) { pump.attach(port) }
    /// Takes everything the guest printed so far. Call while it is paused, before the next epoch opens.
    public func drain() { pump.drain() }
    public func stop() { pump.stop() }
}
