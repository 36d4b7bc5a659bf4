import Foundation
import GeminusCore
import GeminusHA
import Logging

/// `geminus ha agent`: this node's HA daemon. Sets up the node's real world
/// (`HAHostEnvironment`: Corosync, libvirt, fence agents, status and requests) and steps the
/// HA state machine (`HANode`) on its inputs until `durationSeconds` pass (tests) or the
/// cluster is lost.
public enum HAAgentRunner {
    public static func run(options: HAHostEnvironment.Options, config: HAConfig, durationSeconds: Double?) throws {
        let env = try HAHostEnvironment(options: options, logger: Logger(label: "geminus.ha"))
        defer { env.close() }
        let ha = HANode(node: env.localNode, config: config, env: env)
        env.log(.info, "HA agent up: node \(env.localNode.name) (id \(env.localNode.id)), libvirt \(options.uri)"
                + "\(options.domainPrefix.isEmpty ? "" : ", domains \(options.domainPrefix)*"), group \(options.group)")
        env.startThreads()
        let deadline = durationSeconds.map { Monotonic.nanos() + UInt64($0 * 1e9) }
        while deadline.map({ Monotonic.nanos() < $0 }) ?? true {
            env.inbox.wait(timeoutMillis: 100)
            do { try ha.step() } catch {
                // The cluster is lost: the node has stopped what it must and said so; give
                // the status a moment to be read, then exit with the reason.
                Monotonic.sleep(nanos: 500_000_000)
                throw error
            }
        }
    }
}
