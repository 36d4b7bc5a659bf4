/// What a checkpoint of a guest is only valid for: the machine type, emulator and sizes it
/// ran with. A standby built differently would load the device state into the wrong device
/// models, so the secondary compares its own platform with the primary's at the handshake and
/// refuses a mismatch with every difference named. Facts are ordered (name, value) pairs; an
/// empty platform means "not known" (the simulated VM) and is not compared.
public struct GuestPlatform: Sendable, Equatable, CustomStringConvertible {
    public static let maxEncodedBytes = 1024
    public private(set) var facts: [(name: String, value: String)]

    public init(_ facts: [(name: String, value: String)] = []) {
        self.facts = facts.filter { !$0.name.isEmpty && !$0.name.contains("=") && !$0.name.contains("\n") }
            .map { ($0.name, $0.value.split(separator: "\n", omittingEmptySubsequences: false).joined(separator: " ")) }
    }

    public static func == (a: GuestPlatform, b: GuestPlatform) -> Bool {
        a.facts.map(\.name) == b.facts.map(\.name) && a.facts.map(\.value) == b.facts.map(\.value)
    }

    public var isEmpty: Bool { facts.isEmpty }
    public var description: String { facts.map { "\($0.name) \($0.value)" }.joined(separator: ", ") }

    /// One `name=value` line per fact, UTF-8; cut at `maxEncodedBytes` on a line boundary.
    public var encoded: [UInt8] {
        var out: [UInt8] = []
        for f in facts {
            let line = Array("\(f.name)=\(f.value)\n".utf8)
            if out.count + line.count > Self.maxEncodedBytes { break }
            out += line
        }
        return out
    }

    public init?(decoding bytes: [UInt8]) {
        guard let text = String(validating: bytes, as: UTF8.self) else { return nil }
        var facts: [(name: String, value: String)] = []
        for line in text.split(separator: "\n") {
            guard let eq = line.firstIndex(of: "=") else { return nil }
            facts.append((String(line[..<eq]), String(line[line.index(after: eq)...])))
        }
        self.init(facts)
    }

    /// The facts that differ, as "NAME: X on the primary, Y here" lines (this is the local,
    /// secondary side). A fact only one side knows counts as a difference: an unknown value
    /// is no proof that the device state fits. Empty when either platform is empty.
    public func differences(fromPrimary primary: GuestPlatform) -> [String] {
        guard !isEmpty, !primary.isEmpty else { return [] }
        var out: [String] = []
        var names = primary.facts.map(\.name)
        for f in facts where !names.contains(f.name) { names.append(f.name) }
        for name in names {
            let theirs = primary.facts.first { $0.name == name }?.value
            let mine = facts.first { $0.name == name }?.value
            if theirs != mine {
                out.append("\(name): \(theirs ?? "not known") on the primary, \(mine ?? "not known") here")
            }
        }
        return out
    }
}
