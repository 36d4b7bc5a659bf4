import Foundation
import GeminusCore

/// The client side of the agents' control sockets (`StatusServer`), for `geminus status` and
/// `geminus failover`: which sockets to ask, what the answers mean, and the switchover request
/// with the checks before it. The commands print.
public enum StatusClient {
    /// Every agent's answer, in socket order: its status object with "socket" added, or
    /// `["socket": path, "state": "no-answer"]` for an agent that did not answer.
    public struct Survey {
        public var entries: [[String: Any]]
        /// Some VM shown is not protected: UNPROTECTED, peer lost, primary silent, its standby
        /// DOWN, or its agent does not answer (`geminus status` exits 2).
        public var worrying: Bool
    }

    /// The control sockets to ask: `socket` alone when given, else every agent's in
    /// `StatusServer.defaultDirectory` (only `vm`'s when given). Throws when there is none.
    public static func sockets(vm: String?, socket: String?) throws -> [String] {
        if let socket { return [socket] }
        let dir = StatusServer.defaultDirectory
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        let paths = names.filter { $0.hasSuffix(".sock") && (vm == nil || $0.hasPrefix("\(vm!).")) }.sorted().map { "\(dir)/\($0)" }
        guard !paths.isEmpty else {
            throw GeminusError(.connectionFailed, vm.map { "no Geminus agent for '\($0)' runs on this host (no socket in \(dir))" }
                                                  ?? "no Geminus agent runs on this host (no socket in \(dir))")
        }
        return paths
    }

    /// Asks each socket for its agent's status.
    public static func survey(_ paths: [String]) -> Survey {
        var survey = Survey(entries: [], worrying: false)
        for path in paths {
            guard var entry = StatusServer.query(path: path) else {
                survey.entries.append(["socket": path, "state": "no-answer"])
                survey.worrying = true
                continue
            }
            if isWorrying(entry) { survey.worrying = true }
            entry["socket"] = path
            survey.entries.append(entry)
        }
        return survey
    }

    /// Whether an agent's status shows its VM unprotected.
    public static func isWorrying(_ status: [String: Any]) -> Bool {
        let state = status["state"] as? String ?? ""
        if state == "unprotected" || state == "peer-lost" || state == "primary-silent" { return true }
        // A secondary whose standby cannot resume the VM is no protection either.
        return (status["standby"] as? String)?.hasPrefix("DOWN") == true
    }

    /// The answer to a switchover request: the agent's JSON object.
    public struct SwitchoverAnswer {
        public var json: [String: Any]
        /// The VM was handed over (`geminus failover` exits 0, else 1).
        public var handedOver: Bool { json["ok"] as? Bool == true }
        public var message: String? { json["message"] as? String }
        public var guestPausedMicros: Int? { json["guestPausedMicros"] as? Int }
    }

    /// Asks `vm`'s primary agent (at `socket`, default `StatusServer.defaultPath(vm:)`) for a
    /// planned switchover and waits for the outcome, at most `timeoutSeconds` (and 5 s more).
    /// Throws when no agent answers there, when it is not the primary, or when the outcome
    /// does not come in time.
    public static func switchover(vm: String, socket: String?, timeoutSeconds: Int) throws -> SwitchoverAnswer {
        let path = socket ?? StatusServer.defaultPath(vm: vm)
        guard let status = StatusServer.query(path: path) else {
            throw GeminusError(.connectionFailed, "no Geminus agent for '\(vm)' answers on \(path)",
                               fix: "run this on the host of the VM's primary agent, or pass its --socket")
        }
        guard status["role"] as? String == "primary" else {
            throw GeminusError(.invalidArgument, "the agent on \(path) is the \(status["role"] as? String ?? "unknown") for '\(vm)', not its primary",
                               fix: "run `geminus failover \(vm)` on the primary's host")
        }
        guard let result = StatusServer.query(path: path, request: .switchover, timeoutMillis: (timeoutSeconds + 5) * 1000) else {
            throw GeminusError(.timeout, "the agent on \(path) gave no answer within \(timeoutSeconds) s; see its log and `geminus status \(vm)`")
        }
        return SwitchoverAnswer(json: result)
    }
}
