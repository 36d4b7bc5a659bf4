import Foundation
import GeminusCluster
import GeminusCore
@testable import GeminusHA

/// A simulated cluster of HA nodes driven by a scenario script: the simulated Corosync, one
/// `HANode` per host (the same driver `geminus ha agent` runs) over a `SimHost` environment,
/// simulated hypervisors (VM lists and RAM), simulated fence agents that power nodes off, and a
/// simulated clock. Everything that happens goes into `log`.
final class HAWorld {
    var nodes: [SimHost] = []
    var cluster: SimulatedCluster!
    var config = HAConfig()
    var nowMillis: UInt64 = 0
    var log: [String] = []
    var fenceFails: Set<String> = []
    var startFails: Set<String> = []  // "vm@node"
    var fenceMillis: UInt64 = 1000
    var startMillis: UInt64 = 500
    /// Actions in flight: (due time, node index, event).
    var timed: [(at: UInt64, node: Int, event: HAInput)] = []
    var started = false

    static let stepMillis: UInt64 = 100

    func index(_ name: String) throws -> Int {
        guard let i = nodes.firstIndex(where: { $0.node.name == name }) else { throw ScenarioError("no node \(name)") }
        return i
    }

    func say(_ s: String) { log.append(String(format: "%6.1f ", Double(nowMillis) / 1000) + s) }

    // MARK: Commands

    func run(_ line: String) throws {
        let w = line.split(separator: " ").map(String.init)
        func int(_ key: String) -> Int? { w.firstIndex(of: key).flatMap { $0 + 1 < w.count ? Int(w[$0 + 1]) : nil } }
        log.append("> " + line)
        switch (w.first ?? "", w.count) {
        case ("nodes", _):
            let names = w.dropFirst().prefix { $0 != "ram" }
            let ram = int("ram") ?? 16384
            for (i, n) in names.enumerated() {
                nodes.append(SimHost(world: self, index: i, node: ClusterNode(id: ClusterNodeID(i + 1), name: n), ramTotalMiB: ram))
            }
            cluster = SimulatedCluster(nodes: nodes.map(\.node))
        case ("overcommit", 2):
            config.overcommitPercent = Int(w[1])!
            for i in nodes.indices { nodes[i].ha.config = config }
        case ("node", 4) where w[2] == "ram":
            nodes[try index(w[1])].ramTotalMiB = Int(w[3])!
        case ("vm", _):
            // vm NAME on NODE ram MIB [priority N] [ca]
            let i = try index(w[3])
            nodes[i].vms.append(VMReport(name: w[1], ramMiB: int("ram") ?? 1024, kind: w.contains("ca") ? .ca : .ha,
                                         priority: int("priority") ?? 0, definition: w.contains("ca") ? nil : "<domain><name>\(w[1])</name></domain>"))
        case ("start", 1):
            started = true
            for i in nodes.indices { nodes[i].member = cluster.join(nodes[i].node) }
            settle(forMillis: 2000)
        case ("node", 3) where w[2] == "fails":
            let i = try index(w[1])
            powerOff(i, why: "fails")
            settle(forMillis: 100)
        case ("node", 3) where w[2] == "returns":
            let i = try index(w[1])
            nodes[i].powered = true
            nodes[i].vms = []
            nodes[i].lastScan = nil
            nodes[i].boot()
            cluster.reconnect(nodes[i].node)
            nodes[i].member = cluster.join(nodes[i].node)
            say("\(w[1]) boots and rejoins")
            settle(forMillis: 100)
        case ("network", 3), ("quorum", 3):
            // `quorum lost n1` is how an operator sees `network n1 off`: n1 alone, a minority.
            let i = try index(w[2 - (w[0] == "quorum" ? 0 : 1)])
            let off = w[0] == "quorum" ? w[1] == "lost" : w[2] == "off"
            if off { cluster.isolate(nodes[i].node) } else { cluster.reconnect(nodes[i].node) }
            settle(forMillis: 100)
        case ("fence", 3):
            if w[2] == "fails" { fenceFails.insert(w[1]) } else { fenceFails.remove(w[1]) }
        case ("start", 5) where w[2] == "fails":
            startFails.insert("\(w[1])@\(w[4])")
        case ("spare", 3), ("spare", 5) where w[3] == "at":
            // `spare NODE on|off [at NODE]`: an operator on that node, by default the coordinator
            // (any quorate node would do).
            let i = w.count == 5 ? try index(w[4]) : nodes.indices.first { nodes[$0].ha.manager.isCoordinator }!
            deliver(i, .spareRequest(node: w[1], on: w[2] == "on"))
            settle(forMillis: 100)
        case ("wait", 2):
            let t = w[1]
            let ms = t.hasSuffix("ms") ? UInt64(t.dropLast(2))! : UInt64(Double(t.dropLast())! * 1000)
            settle(forMillis: ms)
        case ("placement", _):
            say("placement: " + nodes.filter(\.powered).map { n in "\(n.node.name)[\(n.vms.map(\.name).sorted().joined(separator: ","))]" }.joined(separator: " "))
        default:
            throw ScenarioError("unknown command: \(line)")
        }
    }

    private func powerOff(_ i: Int, why: String) {
        guard nodes[i].powered else { return }
        nodes[i].powered = false
        let lost = nodes[i].vms.map(\.name)
        nodes[i].vms = []
        say("\(nodes[i].node.name) is off (\(why))\(lost.isEmpty ? "" : "; its VMs are gone: " + lost.joined(separator: ", "))")
        if nodes[i].member != nil {
            cluster.fail(nodes[i].node)
            nodes[i].member = nil
        }
        timed.removeAll { $0.node == i }
    }

    // MARK: The loop

    /// Runs the world for `ms` of simulated time in steps: deliver cluster events, scans and due
    /// results to every powered node until nothing moves, then let time pass on each.
    func settle(forMillis ms: UInt64) {
        let end = nowMillis + ms
        repeat {
            cluster.nowMillis = nowMillis
            var rounds = 0
            var busy = true
            while busy {
                busy = false
                rounds += 1
                precondition(rounds < 1000, "the cluster does not settle")
                for i in nodes.indices where nodes[i].powered {
                    let h = nodes[i]
                    if h.lastScan != h.vms {
                        h.lastScan = h.vms
                        h.inbox.append(.scan(HostScan(vms: h.vms, ramTotalMiB: h.ramTotalMiB, ramCommittedMiB: h.vms.reduce(0) { $0 + $1.ramMiB })))
                    }
                    // The cluster's events as they come, including those this node causes while
                    // it handles them (its own publishes): Corosync's agreed order.
                    h.readsCluster = true
                    if drain(i) > 0 { busy = true }
                    h.readsCluster = false
                }
                let due = timed.filter { $0.at <= nowMillis }
                timed.removeAll { $0.at <= nowMillis }
                for d in due where nodes[d.node].powered {
                    busy = true
                    if case .fenceDone(let target, true, _) = d.event, let t = try? index(target) {
                        powerOff(t, why: "fenced")
                    }
                    if case .startDone(let vm, true, _) = d.event, let v = startingVM[vm] {
                        nodes[d.node].vms.append(v)
                    }
                    deliver(d.node, d.event)
                }
                checkOneCopy()
            }
            for i in nodes.indices where nodes[i].powered { nodes[i].ha.tick() }
            if nowMillis >= end { break }
            nowMillis += Self.stepMillis
        } while true
    }

    var startingVM: [String: VMReport] = [:]

    /// Hands `input` to node `i` at once.
    func deliver(_ i: Int, _ input: HAInput) {
        nodes[i].inbox.append(input)
        drain(i)
    }

    @discardableResult
    private func drain(_ i: Int) -> Int {
        do { return try nodes[i].ha.drain() } catch {
            // Only a node whose cluster connection failed: the world powers such nodes off
            // before they could read it.
            preconditionFailure("\(nodes[i].node.name) lost the cluster: \(error)")
        }
    }

    /// S1/S4 in the simulation: a VM never runs on two powered hosts at once.
    var violations: [String] = []
    func checkOneCopy() {
        var seen: [String: String] = [:]
        for n in nodes where n.powered {
            for v in n.vms {
                if let other = seen[v.name] {
                    let s = "VIOLATION: \(v.name) runs on \(other) and \(n.node.name)"
                    if !violations.contains(s) { violations.append(s); say(s) }
                }
                seen[v.name] = n.node.name
            }
        }
    }
}

/// One simulated host: its hypervisor, its fence device as the world runs it, its cluster
/// connection, and the `HANode` that runs on it with this host as its environment.
final class SimHost: HAEnvironment {
    unowned let world: HAWorld
    let index: Int
    let node: ClusterNode
    var ramTotalMiB: Int
    var member: SimulatedClusterMember?
    private(set) var ha: HANode!
    /// VMs physically running on this host (a cut-off host keeps running them).
    var vms: [VMReport] = []
    var powered = true
    var lastScan: [VMReport]?
    /// Inputs the world delivered and the node has not read yet.
    var inbox: [HAInput] = []
    /// Whether `nextInput` also reads the cluster connection (the world says when).
    var readsCluster = false
    private(set) var lastStatus: HAStatus?

    init(world: HAWorld, index: Int, node: ClusterNode, ramTotalMiB: Int) {
        self.world = world
        self.index = index
        self.node = node
        self.ramTotalMiB = ramTotalMiB
        boot()
    }

    /// A fresh agent, as after the host (re)boots.
    func boot() {
        ha = HANode(node: node, config: world.config, env: self)
        inbox = []
    }

    var nowMillis: UInt64 { world.nowMillis }

    func nextInput() -> HAInput? {
        if !inbox.isEmpty { return inbox.removeFirst() }
        guard readsCluster, let m = member else { return nil }
        do { return try m.nextEvent(timeoutMillis: 0).map(HAInput.cluster) } catch let e as GeminusError {
            return .clusterLost(e)
        } catch {
            return .clusterLost(GeminusError(.connectionFailed, "\(error)"))
        }
    }

    func publish(_ state: [UInt8]) throws { try member?.publish(state) }

    func fence(node target: String) {
        let ok = !world.fenceFails.contains(target)
        world.say("\(node.name) runs the fence agent for \(target)")
        world.timed.append((world.nowMillis + world.fenceMillis, index,
                            .fenceDone(node: target, confirmed: ok, detail: ok ? "fence agent exit 0" : "fence agent exit 1")))
    }

    func start(_ v: VMReport) {
        let ok = !world.startFails.contains("\(v.name)@\(node.name)")
        var running = v
        running.state = .running
        world.startingVM[v.name] = running
        world.timed.append((world.nowMillis + world.startMillis, index, .startDone(vm: v.name, ok: ok, detail: ok ? "started" : "libvirt: cannot start")))
    }

    func stop(vm: String) throws { vms.removeAll { $0.name == vm } }

    func log(_ level: HALogLevel, _ text: String) {
        world.say("\(node.name) " + (level == .info ? "" : "\(level): ") + text)
    }

    func publishStatus(_ status: HAStatus) { lastStatus = status }
}

struct ScenarioError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}
