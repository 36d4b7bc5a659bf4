import GeminusCore
import GeminusHypervisor

extension LibvirtGuest {
    public var takeoverFacts: [String: JSONValue] {
        ["guestPid": qemuPID.map { .int(Int($0)) } ?? .null, "domain": .string(domainName)]
    }
}

extension LibvirtGuest {
    public var supportsLiveCopy: Bool { checkpointer.findsWhileRunning }

    public func captureLive(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        try checkpointer.captureLive(full: full, into: buffer)
    }
}
