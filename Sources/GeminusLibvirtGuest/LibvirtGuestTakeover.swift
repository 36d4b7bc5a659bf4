import GeminusCore
import GeminusHypervisor

extension LibvirtGuest {
    public var takeoverFacts: [String: JSONValue] {
        var facts: [String: JSONValue] = ["guestPid": qemuPID.map { .int(Int($0)) } ?? .null, "domain": .string(domainName), "nics": .int(nics.count)]
        // A qcow2 replica's daemon stopped before the resume: what that added to it.
        if let t = resumeTimings, t.releaseDiskNanos > 0 { facts["releaseDiskMicros"] = .int(t.releaseDiskNanos / 1000) }
        return facts
    }
}

extension LibvirtGuest {
    public var supportsLiveCopy: Bool { checkpointer.findsWhileRunning }

    public var fullCopyMustBeLive: Bool { disk?.fullCopyMustBeLive ?? false }
    public var liveCopyDevicesPending: Bool { disk?.liveCopyPending ?? false }

    /// Memory first, then what the disk's mirror received meanwhile (the first round starts it).
    public func captureLive(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        try checkpointer.captureLive(full: full, into: buffer)
        try disk?.captureLive(full: full, into: buffer, qmp: qmp)
    }

    public func abandonLiveCopy() { disk?.abandonLiveCopy() }

    public func collectDiskWrites(while holding: @escaping @Sendable () -> Bool) {
        disk?.export.collect(while: holding)
    }
}
