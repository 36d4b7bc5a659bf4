import GeminusCore
import GeminusHypervisor

// What the hypervisor seam asks of a QEMU guest beyond the checkpoint cycle: a takeover's
// report, the NIC's inbound path, and when its disk records writes.
extension QEMUGuest {
    public var takeoverFacts: [String: JSONValue] {
        var facts: [String: JSONValue] = ["guestPid": .int(Int(process.pid))]
        // With a NIC: how long telling the network where the guest's MAC went took (announce-self).
        if nic != nil { facts["announceMicros"] = .int(announceNanos / 1000) }
        return facts
    }

    public var inboundFrames: (@Sendable ([UInt8]) -> Void)? {
        guard let nic else { return nil }
        return { nic.deliver($0) }
    }

    public func collectDiskWrites(while holding: @escaping @Sendable () -> Bool) {
        disk?.export.collect(while: holding)
    }
}

extension QEMUGuest {
    public var supportsLiveCopy: Bool { checkpointer.findsWhileRunning }
    public var fullCopyMustBeLive: Bool { disk?.fullCopyMustBeLive ?? false }
    public var liveCopyDevicesPending: Bool { disk?.liveCopyPending ?? false }

    /// Memory first, then what the disk's mirror received meanwhile (the first round starts it).
    public func captureLive(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        try checkpointer.captureLive(full: full, into: buffer)
        try disk?.captureLive(full: full, into: buffer, qmp: qmp)
    }

    public func abandonLiveCopy() { disk?.abandonLiveCopy() }
}
