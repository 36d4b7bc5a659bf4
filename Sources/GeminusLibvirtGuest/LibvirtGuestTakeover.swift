import GeminusCore
import GeminusHypervisor

extension LibvirtGuest {
    public var takeoverFacts: [String: JSONValue] {
        ["guestPid": qemuPID.map { .int(Int($0)) } ?? .null, "domain": .string(domainName), "nics": .int(nics.count)]
    }
}
