import ArgumentParser
import GeminusCore
import GeminusTransport

@main
struct Geminus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "geminus",
        abstract: "Continuous availability for KVM virtual machines: checkpoint replication and failover.",
        version: "0.1.0",
        subcommands: [Agent.self, Demo.self, Keygen.self]
    )
}

/// HOST:PORT as given on the command line.
struct Endpoint: ExpressibleByArgument, CustomStringConvertible {
    var host: String
    var port: UInt16

    init?(argument: String) {
        guard let colon = argument.lastIndex(of: ":"),
              let port = UInt16(argument[argument.index(after: colon)...]) else { return nil }
        var host = String(argument[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { return nil }
        self.host = host
        self.port = port
    }

    init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    var description: String { "\(host):\(port)" }
    static var defaultCompletionKind: CompletionKind { .default }
}

/// Turns a GeminusError into the message an operator sees (and exit code 1), instead of a
/// stack of Swift type names.
func operatorFailure(_ error: any Error) -> ValidationError {
    if let e = error as? GeminusError {
        return ValidationError("\(e.message)" + (e.fix.map { "\n  fix: \($0)" } ?? ""))
    }
    return ValidationError("\(error)")
}

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a pair key: 32 random bytes, hex, mode 0600. Copy the same file to both hosts.")

    @Option(name: .long, help: "Where to write the key (refuses to overwrite).")
    var out: String

    func run() throws {
        do {
            try PairKey.generate(path: out)
        } catch {
            throw operatorFailure(error)
        }
        print("wrote pair key \(out) (mode 0600); copy it to the same path on the peer host")
    }
}
