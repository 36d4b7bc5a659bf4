/// The rule for the names of protected VMs and libvirt domains given on the command line.
///
/// A name ends up in file paths (the control socket /run/geminus/VM.sock, run files), in QEMU
/// option strings (where `,` starts a new option) and in log lines, so it is held to a charset
/// that means the same thing in all of them. The length keeps the control socket's path within
/// a unix socket address (108 bytes) with room for its directory.
public enum ResourceName {
    public static let maxBytes = 64
    public static let rule = "1 to \(maxBytes) characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-'"

    /// nil if `name` follows the rule, otherwise why not.
    public static func problem(_ name: String) -> String? {
        let bytes = Array(name.utf8)
        if bytes.isEmpty { return "it is empty" }
        if bytes.count > maxBytes { return "it is \(bytes.count) bytes long" }
        if bytes[0] == UInt8(ascii: ".") || bytes[0] == UInt8(ascii: "-") { return "it starts with '\(Character(Unicode.Scalar(bytes[0])))'" }
        if let bad = name.unicodeScalars.first(where: { !isAllowed($0) }) {
            return "it contains \(bad.isASCII && bad.value >= 0x20 && bad.value < 0x7F ? "'\(bad)'" : "U+\(String(bad.value, radix: 16, uppercase: true))")"
        }
        return nil
    }

    /// Throws an operator-facing error naming the option, the problem and the rule.
    public static func validate(_ name: String, as what: String) throws(GeminusError) {
        guard let problem = problem(name) else { return }
        throw GeminusError(.invalidArgument, "\(what) '\(printable(name))' is not a usable name: \(problem)",
                           fix: "use \(rule) (the name goes into file paths and QEMU options)")
    }

    private static func isAllowed(_ s: Unicode.Scalar) -> Bool {
        switch s {
        case "A"..."Z", "a"..."z", "0"..."9", ".", "_", "-": return true
        default: return false
        }
    }

    /// The name as it can be shown in one log line: control characters escaped, cut short.
    private static func printable(_ name: String) -> String {
        let shown = name.unicodeScalars.prefix(80).map { $0.value < 0x20 || $0.value == 0x7F ? "\\u{\(String($0.value, radix: 16))}" : String($0) }.joined()
        return name.unicodeScalars.count > 80 ? shown + "..." : shown
    }
}
