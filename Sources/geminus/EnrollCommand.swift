import ArgumentParser
import Foundation
import GeminusCore
import GeminusLibvirt
import GeminusQEMU

struct Enroll: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check that a libvirt domain can be protected in CA mode and record its enrolment.",
        discussion: """
        Reads the domain's persistent definition and lists everything that stops continuous \
        availability, with the change each needs. With --prepare it makes the changes it can (shared \
        file-backed memory, no memory balloon, the agent's private QMP socket, each bridge or network \
        interface moved to a loopback socket the agent holds its frames on, recorded with where it was \
        attached) to the persistent definition, after confirmation; they \
        take effect at the domain's next start. An enrolable domain gets a <geminus:enrollment> element \
        in its <metadata> naming the peer and the checkpoint interval.
        """)

    @Argument(help: "The libvirt domain.") var domain: String
    @Option(help: "The secondary host, HOST[:PORT] (default port 7400).") var peer: String
    @Option(name: [.customLong("interval-millis"), .customLong("interval")], help: "Checkpoint interval in milliseconds.") var intervalMillis = 25
    @Flag(help: "Change the persistent definition so the domain can be protected.") var prepare = false
    @Flag(name: .shortAndLong, help: "With --prepare: do not ask for confirmation.") var yes = false
    @Option(help: "libvirt connection URI.") var uri = LibvirtConnection.defaultURI
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        try InputCheck.name(domain, "domain")
        guard intervalMillis >= 1 && intervalMillis <= 10_000 else { throw ValidationError("--interval-millis must be 1...10000") }
        guard !peer.isEmpty, !peer.contains(" ") else { throw ValidationError("--peer must be HOST or HOST:PORT") }
    }

    /// HOST:PORT as given, or HOST with the agent's default port.
    var peerAddress: String { Endpoint(argument: peer) != nil ? peer : "\(peer):7400" }

    func run() throws {
        do {
            let enrollment = try DomainEnrollment(uri: uri, domain: domain)
            defer { enrollment.close() }
            if prepare, let change = try enrollment.preparation(writeTrackingLibrary: WriteTrackingPreload.locate()) {
                say("--prepare will change the persistent definition of '\(domain)':")
                for p in change.fixes { say("  - \(p.message): \(p.fix)") }
                for i in change.heldInterfaces {
                    say("  - interface \(i.mac) (\(i.model ?? "default model")) on \(i.attachment): QEMU listens on \(HeldInterfaces.loopback):\(i.port) for the agent, which releases its frames on \(i.attachment) once their checkpoint is acknowledged (`geminus unenroll` puts the interface back)")
                }
                if let library = change.addsWriteTracking {
                    say("  - write tracking: QEMU starts with LD_PRELOAD=\(library), so each checkpoint copies the pages written instead of comparing all of guest RAM")
                }
                say("The change takes effect at the next start of '\(domain)'.")
                guard yes || confirm("Apply? [y/N] ") else {
                    throw OperatorError(description: "nothing changed: not confirmed (use --yes when not interactive)")
                }
                try enrollment.apply(change)
                say("updated the definition of '\(domain)'")
            }
            let check = enrollment.check
            guard check.canProtect else {
                if json { printJSON(["domain": domain, "enrolled": false, "problems": check.problems.map { ["code": $0.code.rawValue, "message": $0.message, "fix": $0.fix] }]) }
                var lines = ["domain '\(domain)' cannot be protected in CA mode:"]
                for p in check.problems { lines.append("  - \(p.message)\n    fix: \(p.fix)") }
                if !prepare { lines.append("`geminus enroll \(domain) --peer \(peer) --prepare` makes the changes it can (memory backing, balloon, private QMP socket, bridge and network interfaces)") }
                throw OperatorError(description: lines.joined(separator: "\n"))
            }
            let enrolled = try enrollment.enroll(peer: peerAddress, intervalMilliseconds: intervalMillis)
            let preload = enrollment.writeTrackingPreload
            let dirtyPages = preload.map { "write tracking (QEMU starts with LD_PRELOAD=\($0))" }
                ?? "compare (all of guest RAM at every checkpoint): for write tracking, \(WriteTrackingPreload.buildHint), then `geminus enroll \(domain) --peer \(peer) --prepare` again"
            if json {
                printJSON(["domain": domain, "enrolled": true, "peer": enrolled.peer, "intervalMillis": intervalMillis,
                           "machineType": check.facts.machineType ?? "", "memoryKiB": check.facts.memoryKiB ?? 0,
                           "writeTrackingPreload": preload ?? ""])
            } else {
                say("enrolled '\(domain)' for CA: peer \(enrolled.peer), checkpoint every \(intervalMillis) ms (machine \(check.facts.machineType ?? "?"), \((check.facts.memoryKiB ?? 0) / 1024) MiB)")
                say("dirty pages: \(dirtyPages)")
                say("the peer must offer the same machine type and emulator; the agents compare them when they connect")
            }
        } catch {
            throw operatorFailure(error)
        }
    }

    func say(_ s: String) { if !json { print(s) } else { FileHandle.standardError.write(Data((s + "\n").utf8)) } }

    func confirm(_ prompt: String) -> Bool {
        guard isatty(0) != 0 else { return false }
        print(prompt, terminator: "")
        return (readLine() ?? "").lowercased().hasPrefix("y")
    }
}

struct Unenroll: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Remove a domain's Geminus enrolment and put back the network interfaces `enroll --prepare` moved (at the domain's next start); the rest of its definition is left as it is.")

    @Argument(help: "The libvirt domain.") var domain: String
    @Option(help: "libvirt connection URI.") var uri = LibvirtConnection.defaultURI

    func validate() throws {
        try InputCheck.name(domain, "domain")
    }

    func run() throws {
        do {
            let r = try DomainEnrollment.unenroll(uri: uri, domain: domain)
            if r.restoredInterfaces > 0 || !r.missingInterfaces.isEmpty {
                print("restored \(r.restoredInterfaces) network interface(s) of '\(domain)' as they were before enrolment (at its next start)\(r.missingInterfaces.isEmpty ? "" : "; recorded but no longer in the definition: \(r.missingInterfaces.joined(separator: ", "))")")
            }
            if r.removedEnrollment { print("removed the enrolment of '\(domain)'") }
        } catch {
            throw operatorFailure(error)
        }
    }
}

func printJSON(_ object: Any) {
    if let data = try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]) {
        print(String(decoding: data, as: UTF8.self))
    }
}
