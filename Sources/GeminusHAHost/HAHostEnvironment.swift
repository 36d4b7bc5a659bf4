import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import GeminusCluster
import GeminusCore
import GeminusHA
import GeminusLibvirt
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The real world of an `HANode`: Corosync through `CorosyncCluster`, this host's libvirt, the
/// fence agents, and the state directory (status file and operator requests).
///
/// A separate module from `GeminusHA` so that the HA logic (manager and node) stays free of
/// libvirt, processes and files, and its tests build and run without them.
///
/// Threads: a cluster reader and a host scanner feed `inbox`, and each fence or start runs on a
/// thread of its own and puts its outcome there; `nextInput` and the other `HAEnvironment`
/// calls are made by the one thread that drives the node.
public final class HAHostEnvironment: HAEnvironment, @unchecked Sendable {
    public struct Options: Sendable {
        public var uri: String
        /// Only domains with this prefix belong to this node (several test nodes on one libvirtd).
        public var domainPrefix: String
        /// RAM offered to VMs; nil: the host's MemTotal.
        public var ramMiB: Int?
        public var fenceConfig: String?
        public var fenceTimeoutMillis: Int
        public var stateDir: String
        public var scanIntervalMillis: Int
        public var group: String
        /// The node name the operator expects (checked against Corosync's).
        public var expectedNode: String?

        public init(uri: String, domainPrefix: String, ramMiB: Int?, fenceConfig: String?, fenceTimeoutMillis: Int, stateDir: String,
                    scanIntervalMillis: Int, group: String, expectedNode: String?) {
            self.uri = uri
            self.domainPrefix = domainPrefix
            self.ramMiB = ramMiB
            self.fenceConfig = fenceConfig
            self.fenceTimeoutMillis = fenceTimeoutMillis
            self.stateDir = stateDir
            self.scanIntervalMillis = scanIntervalMillis
            self.group = group
            self.expectedNode = expectedNode
        }
    }

    /// The operator's requests are read at most this often.
    public static let requestsIntervalMillis: UInt64 = 200
    /// Request files read at once (more wait for the next read).
    public static let requestsPerReadMax = 16

    public let options: Options
    public let cluster: CorosyncCluster
    public let libvirt: LibvirtConnection
    public let inbox = HAInbox(limit: 1024)
    public let fenceAgents: FenceAgents
    private let logger: Logger
    /// Driving thread only.
    private var requests: [HARequest] = []
    private var requestsReadAtMillis: UInt64?
    /// Scanner thread only.
    private var scanCache: [String: (readAtNanos: UInt64, vm: VMReport?)] = [:]

    public init(options: Options, logger: Logger) throws {
        self.options = options
        fenceAgents = try FenceAgents(configPath: options.fenceConfig, timeoutMillis: options.fenceTimeoutMillis)
        cluster = try CorosyncCluster(groupName: options.group)
        if let n = options.expectedNode, n != cluster.localNode.name {
            cluster.close()
            throw GeminusError(.invalidArgument, "--node \(n) does not match this node's name in corosync.conf ('\(cluster.localNode.name)')",
                               fix: "pass --node \(cluster.localNode.name), or run the agent on the host named \(n) (in its network namespace)")
        }
        do { libvirt = try LibvirtConnection.open(uri: options.uri, timeout: 30) } catch {
            cluster.close()
            throw error
        }
        var l = logger
        l[metadataKey: HALogHandler.nodeKey] = "\(cluster.localNode.name)"
        self.logger = l
        try FileManager.default.createDirectory(atPath: HAStatusFile.requestsDir(stateDir: options.stateDir), withIntermediateDirectories: true)
    }

    public var localNode: ClusterNode { cluster.localNode }

    /// Starts the cluster reader and the host scanner.
    public func startThreads() {
        startClusterReader()
        startScanner()
    }

    public func close() { cluster.close() }

    // MARK: HAEnvironment

    public var nowMillis: UInt64 { Monotonic.nanos() / 1_000_000 }

    public func nextInput() -> HAInput? {
        if let i = inbox.pop() { return i }
        if requests.isEmpty, requestsReadAtMillis.map({ nowMillis &- $0 >= Self.requestsIntervalMillis }) ?? true {
            requestsReadAtMillis = nowMillis
            requests = readRequests()
        }
        guard !requests.isEmpty else { return nil }
        let r = requests.removeFirst()
        return .spareRequest(node: r.spareNode, on: r.on)
    }

    public func publish(_ state: [UInt8]) throws { try cluster.publish(state) }

    public func fence(node: String) {
        let agents = fenceAgents
        Thread { [inbox] in
            let (ok, detail) = agents.run(node: node)
            inbox.push(.fenceDone(node: node, confirmed: ok, detail: detail))
        }.start()
    }

    public func start(_ vm: VMReport) {
        Thread { [self] in
            do {
                try startDomain(vm)
                inbox.push(.startDone(vm: vm.name, ok: true, detail: "libvirt started \(options.domainPrefix)\(vm.name)"))
            } catch {
                inbox.push(.startDone(vm: vm.name, ok: false, detail: "\(error)"))
            }
        }.start()
    }

    public func stop(vm: String) throws {
        let d = try libvirt.lookupDomain(named: options.domainPrefix + vm, timeout: 5)
        try libvirt.destroy(d, timeout: 5)
    }

    /// Any thread (the reader and the scanner log too).
    public func log(_ level: HALogLevel, _ text: String) {
        logger.log(level: level.loggerLevel, "\(text)")
    }

    public func publishStatus(_ status: HAStatus) {
        let file = HAStatusFile(host: .init(pid: getpid(), uri: options.uri, domainPrefix: options.domainPrefix,
                                            updatedAtMillis: WallClock.micros() / 1000), status: status)
        guard let data = try? file.encoded() else { return }
        try? data.write(to: URL(fileURLWithPath: HAStatusFile.path(stateDir: options.stateDir)), options: .atomic)
    }

    // MARK: Inputs

    private func startClusterReader() {
        let t = Thread { [self] in
            while true {
                do {
                    guard let e = try cluster.nextEvent(timeoutMillis: 500) else { continue }
                    inbox.push(.cluster(e))
                } catch let e as GeminusError {
                    inbox.push(.clusterLost(e))
                    return
                } catch {
                    inbox.push(.clusterLost(GeminusError(.connectionFailed, "\(error)")))
                    return
                }
            }
        }
        t.name = "ha-cluster-reader"
        t.start()
    }

    /// The hypervisor, every scan interval, on a thread of its own: libvirt calls may take
    /// seconds, and the node must keep answering the cluster meanwhile.
    private func startScanner() {
        let t = Thread { [self] in
            var lastError = ""
            while true {
                do {
                    inbox.push(.scan(try scan()))
                    lastError = ""
                } catch {
                    let s = "\(error)"
                    if s != lastError { log(.error, "libvirt scan failed: \(s)") }
                    lastError = s
                }
                Monotonic.sleep(nanos: UInt64(options.scanIntervalMillis) * 1_000_000)
            }
        }
        t.name = "ha-scanner"
        t.start()
    }

    /// The domains of this node that run, their RAM, and which are HA (metadata) or CA (enrolled).
    func scan() throws -> HostScan {
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
        return HostScan(vms: vms, ramTotalMiB: options.ramMiB ?? Self.memTotalMiB(), ramCommittedMiB: mine.reduce(0) { $0 + $1.memoryMiB })
    }

    public static func memTotalMiB() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("MemTotal:") }),
              let kib = Int(line.split(separator: " ")[1]) else { return 0 }
        return kib / 1024
    }

    /// The request files waiting (each removed once read; one that does not parse is dropped).
    private func readRequests() -> [HARequest] {
        let dir = HAStatusFile.requestsDir(stateDir: options.stateDir)
        guard let files = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return [] }
        var out: [HARequest] = []
        for f in files.sorted().prefix(Self.requestsPerReadMax) where f.hasSuffix(".json") {
            let p = dir + "/" + f
            defer { try? FileManager.default.removeItem(atPath: p) }
            guard let data = FileManager.default.contents(atPath: p), let r = try? JSONDecoder().decode(HARequest.self, from: data) else {
                log(.warning, "ignored the request \(f): it does not parse")
                continue
            }
            out.append(r)
        }
        return out
    }

    // MARK: Starting a VM

    /// Defines the VM from the definition its old node published (renamed into this node's
    /// prefix, when a prefix is used), then starts it.
    func startDomain(_ vm: VMReport) throws {
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
    public static func retarget(_ xml: String, name: String, uuid: String?) throws -> String {
        let doc = try XMLDocument(xmlString: xml, options: [.nodePreserveAll])
        guard let root = doc.rootElement() else { throw GeminusError(.invalidArgument, "empty domain XML") }
        root.elements(forName: "name").first?.stringValue = name
        if let uuid {
            for u in root.elements(forName: "uuid") { u.detach() }
            if !uuid.isEmpty { root.insertChild(XMLElement(name: "uuid", stringValue: uuid), at: 1) }
        }
        return root.xmlString
    }
}
