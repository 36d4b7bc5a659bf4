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

    func validate() throws {
        try InputCheck.name(vm, "VM")
        try InputCheck.range(timeoutSeconds, "--timeout-seconds", 1...86_400, unit: "seconds")
    }

    func run() throws {
        let result: StatusClient.SwitchoverAnswer
        do { result = try StatusClient.switchover(vm: vm, socket: socket, timeoutSeconds: timeoutSeconds) } catch { throw operatorFailure(error) }
        if json {
            let data = try JSONSerialization.data(withJSONObject: result.json, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            var line = result.message ?? "no message"
            if let us = result.guestPausedMicros { line += String(format: " (guest paused %.1f ms)", Double(us) / 1000) }
            print(line)
        }
        guard result.handedOver else { throw ExitCode(1) }
    }
}
