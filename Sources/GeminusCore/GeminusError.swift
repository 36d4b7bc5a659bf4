/// An error an operator reads: what went wrong and what to do about it. The code is stable for
/// scripts (`--json` output carries it); the message and fix are for people.
public struct GeminusError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Code: String, Sendable {
        case invalidArgument = "invalid-argument"
        case keyFile = "key-file"
        case addressInUse = "address-in-use"
        case connectionFailed = "connection-failed"
        case protocolMismatch = "protocol-mismatch"
        case authenticationFailed = "authentication-failed"
        case peerRefused = "peer-refused"
        case timeout = "timeout"
        case resourceExhausted = "resource-exhausted"
        case hypervisor = "hypervisor"
        case io = "io"
        case internalInvariant = "internal"
    }

    public var code: Code
    public var message: String
    public var fix: String?

    public init(_ code: Code, _ message: String, fix: String? = nil) {
        self.code = code
        self.message = message
        self.fix = fix
    }

    public var description: String {
        if let fix { return "\(message); \(fix)" }
        return message
    }
}
