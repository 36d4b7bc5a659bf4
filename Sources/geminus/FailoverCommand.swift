import ArgumentParser
import Foundation
import GeminusAgent

struct Failover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Planned switchover: move a protected VM to its secondary without losing anything.",
        discussion: """
        Run on the primary's host. The primary pauses the VM, sends a final checkpoint, and once \
        the secondary has acknowledged it tells the secondary to resume the VM there; then it \
        stops its own copy. If the secondary cannot resume it, the VM runs on here. Agents \
        started with both --listen and --peer swap roles, so the VM stays protected (in the \
        other direction). Exit status 0 when the VM was handed over, 1 when it was not.
        """)

    @Argument(help: "The VM (as given to the agent's --vm).") var vm: String
    @Option(help: "The primary agent's control socket (default /run/geminus/VM.sock).") var socket: String?
    @Option(help: "Give up waiting for the outcome after this many seconds.") var timeoutSeconds = 60
    @Flag(help: "Print the outcome as JSON.") var json = false

    func run() throws {
        let path = socket ?? StatusServer.defaultPath(vm: vm)
        guard let status = StatusServer.query(path: path) else {
            throw OperatorError(description: "no Geminus agent for '\(vm)' answers on \(path)\n  fix: run this on the host of the VM's primary agent, or pass its --socket")
        }
        guard status["role"] as? String == "primary" else {
            throw OperatorError(description: "the agent on \(path) is the \(status["role"] as? String ?? "unknown") for '\(vm)', not its primary\n  fix: run `geminus failover \(vm)` on the primary's host")
        }
        guard let result = StatusServer.query(path: path, request: .switchover, timeoutMillis: (timeoutSeconds + 5) * 1000) else {
            throw OperatorError(description: "the agent on \(path) gave no answer within \(timeoutSeconds) s; see its log and `geminus status \(vm)`")
        }
        if json {
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            var line = result["message"] as? String ?? "no message"
            if let us = result["guestPausedMicros"] as? Int { line += String(format: " (guest paused %.1f ms)", Double(us) / 1000) }
            print(line)
        }
        guard result["ok"] as? Bool == true else { throw ExitCode(1) }
    }
}
