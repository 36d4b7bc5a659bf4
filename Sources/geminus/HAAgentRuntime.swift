import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCluster
import GeminusCore
import GeminusHA
import GeminusLibvirt
#if canImport(Glibc)
import Glibc
#endif

/// What `geminus ha agent` writes for the other commands of this node (`ha status`, `ha add`,
/// `node spare`): the cluster as this node sees it. Rewritten atomically on every change.
struct HAStatusFile: Codable {
    struct Member: Codable {
        var name: String
        var id: UInt32
        var spare: Bool
        var ramTotalMiB: Int?
        var ramFreeMiB: Int?
        var vms: [VMReport]
    }

    var node: String
    var nodeID: UInt32
    var pid: Int32
    var uri: String
    var domainPrefix: String
    var updatedAtMillis: UInt64
    var quorate: Bool
    var quorumChangedAgoMillis: UInt64
    var coordinator: String?
    var members: [Member]
    var fenced: [String]
    var recovery: [RecoveryEntry]

    static func path(stateDir: String) -> String { stateDir + "/status.json" }

    /// The agent's status, or an error saying how to get one.
    static func read(stateDir: String, maxAgeMillis: UInt64 = 5000) throws -> HAStatusFile {
        let p = path(stateDir: stateDir)
        guard let data = FileManager.default.contents(atPath: p) else {
            throw GeminusError(.connectionFailed, "the HA agent is not running on this node (no \(p))",
                               fix: "start it: `geminus ha agent --state-dir \(stateDir) …` (docs/HA.md), or pass the --state-dir it uses")
        }
        let s: HAStatusFile
        do { s = try JSONDecoder().decode(HAStatusFile.self, from: data) } catch {
            throw GeminusError(.io, "\(p) does not parse: \(error)", fix: "restart `geminus ha agent`")
        }
        let age = WallClock.micros() / 1000 &- s.updatedAtMillis
        if age > maxAgeMillis || kill(s.pid, 0) != 0 {
            throw GeminusError(.connectionFailed, "the HA agent of this node is not running (its status in \(p) is \(age / 1000) s old, pid \(s.pid))",
                               fix: "start it again: `geminus ha agent --state-dir \(stateDir) …`")
        }
        return s
    }

    static func requestsDir(stateDir: String) -> String { stateDir + "/requests" }
}

/// An operator's request to the agent (a file in STATE_DIR/requests, consumed by the agent).
struct HARequest: Codable {
    var spareNode: String
    var on: Bool
}

/// `geminus ha agent`: the HA state machine driven by Corosync, libvirt, fence agents and a clock.
final class HAAgentRuntime: @unchecked Sendable {
    struct Options {
        var uri: String
        var domainPrefix: String
        var ramMiB: Int?
        var fenceConfig: String?
        var fenceTimeoutMillis: Int
        var stateDir: String
        var scanIntervalMillis: Int
        var group: String
        var config: HAConfig
        var expectedNode: String?
        var durationSeconds: Double?
    }

    let options: Options
    let cluster: CorosyncCluster
    var manager: HAManager
    let libvirt: LibvirtConnection
    let inbox = Inbox(limit: 1024)
    let fenceCommands: [String: [String]]
    let started = Monotonic.nanos()
    private var lastStatus: Data?
    /// Scanner thread only.
    private var scanCache: [String: (readAtNanos: UInt64, vm: VMReport?)] = [:]

    init(options: Options) throws {
        self.options = options
        fenceCommands = try Self.readFenceConfig(options.fenceConfig)
        cluster = try CorosyncCluster(groupName: options.group)
        if let n = options.expectedNode, n != cluster.localNode.name {
            cluster.close()
            throw GeminusError(.invalidArgument, "--node \(n) does not match this node's name in corosync.conf ('\(cluster.localNode.name)')",
                               fix: "pass --node \(cluster.localNode.name), or run the agent on the host named \(n) (in its network namespace)")
        }
        libvirt = try LibvirtConnection.open(uri: options.uri, timeout: 30)
        manager = HAManager(node: cluster.localNode, config: options.config)
        try FileManager.default.createDirectory(atPath: HAStatusFile.requestsDir(stateDir: options.stateDir), withIntermediateDirectories: true)
    }

    var nowMillis: UInt64 { (Monotonic.nanos() - started) / 1_000_000 }

    /// Any thread (the reader and the scanner log too): reads nothing the main loop mutates.
    func log(_ level: HALogLevel, _ text: String) {
        let t = Double(WallClock.micros()) / 1_000_000
        let stamp = String(format: "%.3f", t)
        FileHandle.standardError.write(Data("\(stamp) \(cluster.localNode.name) \(level == .info ? "" : "\(level): ")\(text)\n".utf8))
    }

    func run() throws {
        log(.info, "HA agent up: node \(cluster.localNode.name) (id \(cluster.localNode.id)), libvirt \(options.uri)\(options.domainPrefix.isEmpty ? "" : ", domains \(options.domainPrefix)*"), group \(options.group)")
        startClusterReader()
        startScanner()
        let deadline = options.durationSeconds.map { Monotonic.nanos() + UInt64($0 * 1e9) }
        var lastRequestPoll: UInt64 = 0
        while deadline.map({ Monotonic.nanos() < $0 }) ?? true {
            let event = inbox.pop(timeoutMillis: 100) ?? .ha(.tick)
            if case .lost(let e) = event {
                // Outside the cluster now: behave as a node without quorum, then stop.
                log(.error, "\(e.message); \(e.fix ?? "")")
                perform(manager.handle(.quorum(QuorumState(quorate: false, changedAtMillis: nowMillis)), nowMillis: nowMillis))
                writeStatus()
                Thread.sleep(forTimeInterval: 0.5)
                throw e
            }
            if case .ha(let e) = event { perform(manager.handle(e, nowMillis: nowMillis)) }
            if nowMillis - lastRequestPoll >= 200 {
                lastRequestPoll = nowMillis
                pollRequests()
                writeStatus()
            }
        }
        cluster.close()
    }

    // MARK: Inputs

    private func startClusterReader() {
        let t = Thread { [self] in
            while true {
                do {
                    guard let e = try cluster.nextEvent(timeoutMillis: 500) else { continue }
                    switch e {
                    case .membership(let m): inbox.push(.ha(.membership(m)))
                    case .quorum(let q): inbox.push(.ha(.quorum(q)))
                    case .published(let from, let bytes):
                        do { inbox.push(.ha(.report(from: from, try NodeReport.decode(bytes)))) } catch {
                            log(.warning, "ignored a state from \(from.name): \(error)")
                        }
                    }
                } catch let e as GeminusError {
                    inbox.push(.lost(e))
                    return
                } catch {
                    inbox.push(.lost(GeminusError(.connectionFailed, "\(error)")))
                    return
                }
            }
        }
        t.name = "ha-cluster-reader"
        t.start()
    }

    /// The hypervisor, every scan interval: the domains of this node that run, their RAM, and
    /// which are HA (metadata) or CA (enrolled).
    private func startScanner() {
        let t = Thread { [self] in
            var lastError = ""
            while true {
                do {
                    inbox.push(.ha(try scan()))
                    lastError = ""
                } catch {
                    let s = "\(error)"
                    if s != lastError { log(.error, "libvirt scan failed: \(s)") }
                    lastError = s
                }
                Thread.sleep(forTimeInterval: Double(options.scanIntervalMillis) / 1000)
            }
        }
        t.name = "ha-scanner"
        t.start()
    }

    func scan() throws -> HAEvent {
        let all = try libvirt.listDomains(timeout: 10)
        let mine = all.filter { $0.active && $0.name.hasPrefix(options.domainPrefix) }
        var vms: [VMReport] = []
        let now = Monotonic.nanos()
        for d in mine {
            let vmName = String(d.name.dropFirst(options.domainPrefix.count))
            // Metadata and definitions change rarely: read them when a domain appears and then
            // every few seconds, not at every scan (each is an RPC to libvirtd, which the
            // restarts themselves need).
            if let c = scanCache[d.name], now - c.readAtNanos < 3_000_000_000 {
                if let v = c.vm { vms.append(v) }
                continue
            }
            guard let dom = try? libvirt.lookupDomain(named: d.name, timeout: 10) else { continue }
            var vm: VMReport?
            if let ha = try? libvirt.readHA(of: dom, timeout: 10) {
                let xml = try? libvirt.xml(of: dom, .persistent, timeout: 10)
                vm = VMReport(name: vmName, ramMiB: d.memoryMiB, kind: .ha, priority: ha.priority, definition: xml)
            } else if (try? libvirt.readEnrollment(of: dom, timeout: 10)) != nil {
                vm = VMReport(name: vmName, ramMiB: d.memoryMiB, kind: .ca)
            }
            scanCache[d.name] = (now, vm)
            if let vm { vms.append(vm) }
        }
        scanCache = scanCache.filter { k, _ in mine.contains { $0.name == k } }
        // Free RAM as committed, not as the kernel's MemAvailable: a guest touches its RAM
        // lazily, so MemAvailable would promise room that its VMs already own.
        let total = options.ramMiB ?? Self.memTotalMiB()
        let used = mine.reduce(0) { $0 + $1.memoryMiB }
        return .localScan(vms: vms.sorted { $0.name < $1.name }, ramTotalMiB: total, ramFreeMiB: total - used)
    }

    static func memTotalMiB() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("MemTotal:") }),
              let kib = Int(line.split(separator: " ")[1]) else { return 0 }
        return kib / 1024
    }

    private func pollRequests() {
        let dir = HAStatusFile.requestsDir(stateDir: options.stateDir)
        guard let files = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return }
        for f in files.sorted().prefix(16) where f.hasSuffix(".json") {
            let p = dir + "/" + f
            defer { try? FileManager.default.removeItem(atPath: p) }
            guard let data = FileManager.default.contents(atPath: p), let r = try? JSONDecoder().decode(HARequest.self, from: data) else { continue }
            guard manager.quorate, manager.members.contains(where: { $0.name == r.spareNode }) else {
                log(.warning, "refused: spare \(r.spareNode) \(r.on ? "on" : "off") (not quorate, or no such member)")
                continue
            }
            perform(manager.handle(.setSpare(node: r.spareNode, on: r.on), nowMillis: nowMillis))
        }
    }

    // MARK: Outputs

    func perform(_ actions: [HAAction]) {
        for a in actions {
            switch a {
            case .log(let level, let text):
                log(level, text)
            case .publish(let r):
                do { try cluster.publish(r.encoded()) } catch { log(.error, "cannot publish this node's state: \(error)") }
            case .fence(let node):
                let argv = fenceCommands[node]
                Thread { [self] in
                    let (ok, detail) = runFence(node: node, argv: argv)
                    inbox.push(.ha(.fenceDone(node: node, confirmed: ok, detail: detail)))
                }.start()
            case .start(let vm):
                Thread { [self] in
                    do {
                        try startVM(vm)
                        inbox.push(.ha(.startDone(vm: vm.name, ok: true, detail: "libvirt started \(options.domainPrefix)\(vm.name)")))
                    } catch {
                        inbox.push(.ha(.startDone(vm: vm.name, ok: false, detail: "\(error)")))
                    }
                }.start()
            case .stop(let names):
                // Self-fence: at once and on this thread; a stuck libvirt is bounded by its timeout.
                for n in names {
                    do {
                        let d = try libvirt.lookupDomain(named: options.domainPrefix + n, timeout: 5)
                        try libvirt.destroy(d, timeout: 5)
                        log(.warning, "stopped \(n) (self-fence)")
                    } catch {
                        log(.error, "SELF-FENCE: cannot stop \(n): \(error); this host must be powered off by its fence agent")
                    }
                }
            }
        }
    }

    /// Runs the node's fence agent with a timeout: exit 0 confirms the node is off.
    func runFence(node: String, argv: [String]?) -> (Bool, String) {
        guard let argv, let exe = argv.first else {
            return (false, "no fence agent configured for \(node)\(options.fenceConfig.map { " in \($0)" } ?? " (no --fence-config)")")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = Array(argv.dropFirst())
        p.standardInput = FileHandle.nullDevice
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        let t0 = Monotonic.nanos()
        do { try p.run() } catch { return (false, "cannot run \(exe): \(error)") }
        let limit = t0 + UInt64(options.fenceTimeoutMillis) * 1_000_000
        while p.isRunning && Monotonic.nanos() < limit { Thread.sleep(forTimeInterval: 0.005) }
        if p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            return (false, "\(exe) did not finish within \(options.fenceTimeoutMillis) ms (killed)")
        }
        let ms = (Monotonic.nanos() - t0) / 1_000_000
        let text = String(decoding: out.fileHandleForReading.availableData.prefix(400), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        if p.terminationStatus == 0 { return (true, "\(URL(fileURLWithPath: exe).lastPathComponent) exit 0 in \(ms) ms") }
        return (false, "\(URL(fileURLWithPath: exe).lastPathComponent) exit \(p.terminationStatus) in \(ms) ms\(text.isEmpty ? "" : ": \(text)")")
    }

    /// Defines the VM from the definition its old node published (renamed into this node's
    /// prefix, when a prefix is used), then starts it.
    func startVM(_ vm: VMReport) throws {
        guard let xml = vm.definition else {
            throw GeminusError(.invalidArgument, "no definition of \(vm.name) was published", fix: "is it an HA VM with a persistent definition?")
        }
        let name = options.domainPrefix + vm.name
        let existing = try? libvirt.lookupDomain(named: name, timeout: 10)
        if let d = existing, (try? libvirt.isActive(d, timeout: 10)) == true { return }
        // A definition of that name may be here already (an earlier run of the VM on this node):
        // redefine it under its own UUID, which libvirt requires.
        let uuid = existing?.uuid ?? (options.domainPrefix.isEmpty ? nil : "")
        let dom = try libvirt.defineDomain(xml: try Self.retarget(xml, name: name, uuid: uuid), timeout: 30)
        try libvirt.start(dom, timeout: 30)
    }

    /// The definition under `name`; `uuid` nil keeps the published UUID (real hosts: the same
    /// VM), "" drops it (one libvirtd: the old node's definition still holds it), else sets it.
    static func retarget(_ xml: String, name: String, uuid: String?) throws -> String {
        let doc = try XMLDocument(xmlString: xml, options: [.nodePreserveAll])
        guard let root = doc.rootElement() else { throw GeminusError(.invalidArgument, "empty domain XML") }
        root.elements(forName: "name").first?.stringValue = name
        if let uuid {
            for u in root.elements(forName: "uuid") { u.detach() }
            if !uuid.isEmpty { root.insertChild(XMLElement(name: "uuid", stringValue: uuid), at: 1) }
        }
        return root.xmlString
    }

    private func writeStatus() {
        let m = manager
        let members = m.members.map { n -> HAStatusFile.Member in
            let r = n == m.node ? m.report : m.reports[n.name]
            return HAStatusFile.Member(name: n.name, id: n.id, spare: m.settings.spares.contains(n.name), ramTotalMiB: r?.ramTotalMiB,
                                       ramFreeMiB: r?.ramFreeMiB, vms: (r?.vms ?? []).map { var v = $0; v.definition = nil; return v })
        }
        let q = cluster.quorum
        let s = HAStatusFile(node: m.node.name, nodeID: m.node.id, pid: getpid(), uri: options.uri, domainPrefix: options.domainPrefix,
                             updatedAtMillis: WallClock.micros() / 1000, quorate: m.quorate,
                             quorumChangedAgoMillis: Monotonic.nanos() / 1_000_000 &- q.changedAtMillis,
                             coordinator: m.coordinator?.name, members: members, fenced: m.table.fenced,
                             recovery: m.table.entries.map { var e = $0; e.vm.definition = nil; return e })
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .prettyPrinted]
        guard let data = try? e.encode(s) else { return }
        let path = HAStatusFile.path(stateDir: options.stateDir)
        try? data.write(to: URL(fileURLWithPath: path), options: .atomic)
        lastStatus = data
    }

    static func readFenceConfig(_ path: String?) throws -> [String: [String]] {
        guard let path else { return [:] }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw GeminusError(.invalidArgument, "cannot read the fence configuration \(path)",
                               fix: "one line per node: `NODE /usr/sbin/fence_ipmilan --ip=… --username=… --password-script=… --action=off`")
        }
        var out: [String: [String]] = [:]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            guard words.count >= 2, words[1].hasPrefix("/") else {
                throw GeminusError(.invalidArgument, "\(path) line \(i + 1): expected `NODE /absolute/path/to/fence_agent ARGS…`, got `\(line)`")
            }
            out[words[0]] = Array(words.dropFirst())
        }
        return out
    }
}

/// The agent's inbox: cluster events, scans and results of fences and starts, bounded.
final class Inbox: @unchecked Sendable {
    enum Item {
        case ha(HAEvent)
        case lost(GeminusError)
    }

    private let cond = NSCondition()
    private var items: [Item] = []
    private var droppedScans = 0
    let limit: Int

    init(limit: Int) { self.limit = limit }

    func push(_ item: Item) {
        cond.withLock {
            if items.count >= limit {
                // Scans are periodic and superseded by the next: drop the oldest one first.
                if let i = items.firstIndex(where: { if case .ha(.localScan) = $0 { return true }; return false }) {
                    items.remove(at: i)
                    droppedScans += 1
                } else {
                    // Everything else must be handled; the producers are few and bounded
                    // (one reader, one scanner, one thread per fence or start), so this is a bug.
                    assertionFailure("HA agent inbox full")
                }
            }
            items.append(item)
            cond.signal()
        }
    }

    func pop(timeoutMillis: Int) -> Item? {
        cond.lock()
        defer { cond.unlock() }
        let deadline = Date().addingTimeInterval(Double(timeoutMillis) / 1000)
        while items.isEmpty { if !cond.wait(until: deadline) { break } }
        return items.isEmpty ? nil : items.removeFirst()
    }
}
