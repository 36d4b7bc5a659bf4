import GeminusCore

public enum PeerRole: UInt8, Sendable, CustomStringConvertible {
    case primary = 1
    case secondary = 2

    public var description: String { self == .primary ? "primary" : "secondary" }
}

/// What each agent says about itself in the handshake; the secondary's admission decision
/// (right VM, current generation) is made on the primary's hello.
public struct PeerHello: Sendable, Equatable {
    public static let maxVMNameBytes = 255
    public static let maxAgentVersionBytes = 255
    static let fixedBytes = 32

    public var role: PeerRole
    public var vmName: String
    public var generation: Generation
    public var committedEpoch: Epoch
    public var guestPageCount: UInt64
    public var agentVersion: String
    /// The primary's guest platform, or the standby's (machine type, emulator, sizes); the
    /// secondary refuses a primary whose checkpoints its standby could not resume.
    public var platform: GuestPlatform

    public init(role: PeerRole, vmName: String, generation: Generation, committedEpoch: Epoch,
                guestPageCount: UInt64, agentVersion: String, platform: GuestPlatform = GuestPlatform()) {
        self.role = role
        self.vmName = vmName
        self.generation = generation
        self.committedEpoch = committedEpoch
        self.guestPageCount = guestPageCount
        self.agentVersion = agentVersion
        self.platform = platform
    }

    /// Layout in docs/PROTOCOL.md, "Handshake". Throws for names too long for their length byte
    /// rather than truncating: a cut VM name would be admitted or refused as another VM.
    public func encoded() throws(GeminusError) -> [UInt8] {
        let name = Array(vmName.utf8)
        let version = Array(agentVersion.utf8)
        let platformBytes = platform.encoded
        guard name.count <= Self.maxVMNameBytes else {
            throw GeminusError(.invalidArgument, "VM name '\(vmName.prefix(40))...' is \(name.count) bytes of UTF-8; at most \(Self.maxVMNameBytes) are allowed")
        }
        guard version.count <= Self.maxAgentVersionBytes else {
            throw GeminusError(.invalidArgument, "agent version string is \(version.count) bytes; at most \(Self.maxAgentVersionBytes) are allowed")
        }
        var w = ByteWriter(capacity: Self.fixedBytes + name.count + version.count + platformBytes.count)
        w.u8(role.rawValue)
        w.u8(UInt8(name.count))
        w.u8(UInt8(version.count))
        w.u16(UInt16(platformBytes.count))
        w.zeros(3)
        w.u64(generation.rawValue)
        w.u64(committedEpoch.rawValue)
        w.u64(guestPageCount)
        w.append(name)
        w.append(version)
        w.append(platformBytes)
        return w.bytes
    }

    /// nil for anything malformed: unknown role, lengths that disagree with the size, text
    /// that is not UTF-8, or numbers no real agent sends (a page count over GuestPage.maxCount,
    /// a generation or epoch past its `maxAccepted`). Checking them here means admission and
    /// takeover code can do arithmetic on a hello without overflow checks of its own.
    public init?(decoding bytes: [UInt8]) {
        var r = ByteReader(bytes)
        guard let roleByte = r.u8(), let role = PeerRole(rawValue: roleByte),
              let nameLength = r.u8(), let versionLength = r.u8(), let platformLength = r.u16(),
              Int(platformLength) <= GuestPlatform.maxEncodedBytes, r.skip(3),
              let generation = r.u64(), let committed = r.u64(), let pages = r.u64(),
              bytes.count == Self.fixedBytes + Int(nameLength) + Int(versionLength) + Int(platformLength),
              let name = r.take(Int(nameLength)), let version = r.take(Int(versionLength)),
              let platformBytes = r.take(Int(platformLength)), let platform = GuestPlatform(decoding: Array(platformBytes)),
              let vmName = String(validating: name, as: UTF8.self),
              let agentVersion = String(validating: version, as: UTF8.self),
              pages <= GuestPage.maxCount, Generation(generation).isAcceptable, Epoch(committed).isAcceptable else { return nil }
        self.init(role: role, vmName: vmName, generation: Generation(generation), committedEpoch: Epoch(committed),
                  guestPageCount: pages, agentVersion: agentVersion, platform: platform)
    }
}
