import ArgumentParser
import Foundation
import GeminusAgent

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the protection state of the VMs whose agents run on this host.",
        discussion: "Asks every agent's control socket (/run/geminus/VM.sock unless --socket is given). Exit status 0 when every VM shown is protected or following, 2 when one is UNPROTECTED, its standby is DOWN or its agent does not answer, 1 when no agent was found.")

    @Argument(help: "Only this VM.") var vm: String?
    @Option(help: "Ask this socket only.") var socket: String?
    @Flag(help: "Print JSON (an array of the agents' status objects).") var json = false

    func validate() throws {
        if let vm { try InputCheck.name(vm, "VM") }
    }

    func run() throws {
        let survey: StatusClient.Survey
        do { survey = StatusClient.survey(try StatusClient.sockets(vm: vm, socket: socket)) } catch { throw operatorFailure(error) }
        let all = survey.entries
        if json {
            let data = try JSONSerialization.data(withJSONObject: all, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            for s in all { print(line(s)) }
        }
        if survey.worrying { throw ExitCode(2) }
    }

    func line(_ s: [String: Any]) -> String {
        let vm = s["vm"] as? String ?? "?"
        let role = s["role"] as? String ?? "?"
        let state = s["state"] as? String ?? "?"
        if state == "no-answer" { return "\(s["socket"]!): the agent does not answer (stopped or hung)" }
        func ms(_ key: String, _ p: String) -> String {
            guard let d = s[key] as? [String: Any], let v = d[p] as? Int else { return "-" }
            return String(format: "%.2f", Double(v) / 1000)
        }
        // What runs the VM: "libvirt domain billing-1, dirty pages by compare".
        var guest = (s["guest"] as? String).map { $0 == "libvirt" ? "libvirt domain \(s["domain"] ?? "?")" : "\($0) guest" } ?? ""
        if let method = s["dirtyPages"] as? String { guest += ", dirty pages by \(method)" }
        if !guest.isEmpty { guest = "  (\(guest))" }
        switch role {
        case "primary":
            let shown = state == "unprotected" ? "UNPROTECTED" : state == "protected" ? "PROTECTED" : state.uppercased()
            return "\(vm)  primary  \(shown)  generation \(s["generation"] ?? "?")  epoch \(s["epoch"] ?? 0), acknowledged \(s["acknowledged"] ?? 0)"
                + String(format: "  %.1f epochs/s", s["epochsPerSecond"] as? Double ?? 0)
                + "  pause p50 \(ms("pauseMicros", "p50")) ms p99 \(ms("pauseMicros", "p99")) ms  commit lag p50 \(ms("commitMicros", "p50")) ms"
                + "  held output \(s["heldPackets"] ?? 0) packets \(s["heldBytes"] ?? 0)/\(s["outputLimitBytes"] ?? "?") bytes"
                + ((s["outputStalls"] as? Int ?? 0) > 0 ? " (guest paused for a full buffer \(s["outputStalls"]!) times, \(s["outputStallMillis"] ?? 0) ms\((s["pausedForOutput"] as? Bool ?? false) ? ", PAUSED NOW" : ""))" : "")
                + "  peer \(s["peer"] ?? "none") \((s["linkUp"] as? Bool ?? false) ? "up" : "DOWN")" + guest + ((s["nic"] as? String).map { "  nic \($0)" } ?? "") + ((s["disk"] as? String).map { "  disk \($0)" } ?? "")
        case "secondary":
            let rejections = (s["rejections"] as? [String: Int] ?? [:]).map { "\($0.key) \($0.value)" }.sorted().joined(separator: ", ")
            return "\(vm)  secondary  \(state)  generation \(s["generation"] ?? "?")  committed \(s["committed"] ?? 0)  counter \(s["counter"] ?? 0)"
                + "  rejections \(rejections.isEmpty ? "none" : rejections)  listening \(s["listen"] ?? "?"), primary \((s["linkUp"] as? Bool ?? false) ? "connected" : "NOT connected")"
                + "  standby \(s["standby"] ?? "unknown")" + guest
        default:
            return "\(vm)  \(role)  \(state)"
        }
    }
}
