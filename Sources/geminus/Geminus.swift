import ArgumentParser
import GeminusCore
import GeminusTransport

@main
struct Geminus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "geminus",
        abstract: "Continuous availability for KVM virtual machines: checkpoint replication and failover.",
        version: "0.1.0",
        subcommands: [Enroll.self, Unenroll.self, Agent.self, Status.self, Failover.self, Bench.self, Simulate.self, Demo.self, Keygen.self, HA.self, NodeCommand.self, Witness.self]
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

/// A failure at run time (not a misuse of the command line): ArgumentParser prints it as
/// "Error: ..." without the usage text, and the exit status is 1.
struct OperatorError: Error, CustomStringConvertible {
    var description: String
}

/// Turns an error into what an operator reads: the cause and, where known, the fix.
func operatorFailure(_ error: any Error) -> OperatorError {
    if let e = error as? OperatorError { return e }
    if let e = error as? GeminusError {
        return OperatorError(description: e.message + (e.fix.map { "\n  fix: \($0)" } ?? ""))
    }
    return OperatorError(description: "\(error)")
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
