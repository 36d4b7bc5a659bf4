import Foundation
import GeminusAgent
import GeminusCore
import GeminusHypervisor
import GeminusLibvirt
import GeminusLibvirtGuest
import GeminusQEMU
import Logging

/// What runs the VM on this host, as `geminus agent` was told: the simulated guest, a QEMU the
/// agent starts itself, or a libvirt domain. The runtime's `GuestHost`; the CLI only fills in
/// `Choice` from its options.
public struct AgentGuests: GuestHost {
    public enum Kind: String, CaseIterable, Sendable { case simulated, qemu, libvirt }

    public struct Choice: Sendable {
        public var kind: Kind
        public var vmName: String
        public var ramMiB: Int
        public var workload: SimulatedWorkload
        public var kernel: String?
        public var append: String
        public var counterAddress: Int?
        public var dirtyPages: DirtyPagePolicy.Method
        public var verifyTracking: Bool
        public var trackingReprotect: WriteTrackingReprotect
        public var nicBridge: String?
        public var nicMAC: String?
        public var diskMiB: Int?
        public var domain: String?
        public var uri: String
        public var intervalMillis: Int

        public init(kind: Kind, vmName: String, ramMiB: Int, workload: SimulatedWorkload, kernel: String?, append: String,
                    counterAddress: Int?, dirtyPages: DirtyPagePolicy.Method, verifyTracking: Bool, trackingReprotect: WriteTrackingReprotect,
                    nicBridge: String?, nicMAC: String?, diskMiB: Int?, domain: String?, uri: String, intervalMillis: Int) {
            self.kind = kind
            self.vmName = vmName
            self.ramMiB = ramMiB
            self.workload = workload
            self.kernel = kernel
            self.append = append
            self.counterAddress = counterAddress
            self.dirtyPages = dirtyPages
            self.verifyTracking = verifyTracking
            self.trackingReprotect = trackingReprotect
            self.nicBridge = nicBridge
            self.nicMAC = nicMAC
            self.diskMiB = diskMiB
            self.domain = domain
            self.uri = uri
            self.intervalMillis = intervalMillis
        }

        /// Where the guest keeps its progress counter (the test guests' places unless told).
        public var guestCounterAddress: Int {
            counterAddress ?? (kind == .simulated ? SimulatedGuest.counterAddress : QEMUGuest.tinyGuestCounterAddress)
        }

        public var domainName: String { domain ?? vmName }

        /// The guest NIC's MAC: the same on both hosts (the resumed guest keeps its device state).
        public var guestMAC: MACAddress { nicMAC.flatMap { MACAddress($0) } ?? MACAddress.derived(from: vmName) }
    }

    public let choice: Choice

    public init(_ choice: Choice) { self.choice = choice }

    /// The guest's network on this host (`--nic-bridge`), opened once per agent process.
    public func openHostNetwork(logger: Logger) throws(GeminusError) -> HostNetwork? {
        guard let bridge = choice.nicBridge else { return nil }
        let n = try HostNetwork(interface: bridge, guestMAC: choice.guestMAC.bytes)
        logger.info("guest NIC \(choice.guestMAC) bridged to \(bridge): frames leave once their checkpoint is acknowledged")
        return n
    }

    public func startGuest(port: HeldOutputPort, logger: Logger, events: EventLog) throws -> any ProtectedGuest {
        switch choice.kind {
        case .simulated:
            try choice.workload.validate()
            let sim = try SimulatedVM(workload: choice.workload, output: port)
            sim.start()
            return sim
        case .qemu:
            let q = try QEMUGuest.launch(qemuConfig("primary"), counterAddress: choice.guestCounterAddress,
                                         dirtyPages: dirtyPagePolicy(logger: logger, events: events),
                                         fallback: trackingFallback(logger: logger)).guest
            q.attachOutput(port)
            logger.info("started QEMU (pid \(q.process.pid)) for \(choice.vmName): \(choice.ramMiB) MiB, kernel \(choice.kernel ?? "?")")
            events.emit(.guestStarted, ["pid": Int(q.process.pid), "ramFile": q.process.config.ramFilePath])
            return q
        case .libvirt:
            let l = try LibvirtGuest.attach(connection: try openLibvirt(), domainName: choice.domainName, counterAddress: choice.guestCounterAddress,
                                            dirtyPages: dirtyPagePolicy(logger: logger, events: events), fallback: trackingFallback(logger: logger))
            logger.info("attached to domain \(choice.domainName) (QEMU pid \(l.qemuPID.map(String.init) ?? "unknown"), \((l.pageCount * GuestPage.size) >> 20) MiB, RAM \(l.ramFilePath))")
            events.emit(.guestStarted, ["pid": l.qemuPID.map { Int($0) } ?? NSNull(), "ramFile": l.ramFilePath, "domain": choice.domainName])
            reportEnrollment(of: l, logger: logger)
            return l
        }
    }

    public func makeStandby(serial: Int, logger: Logger, events: EventLog) throws -> (standby: any StandbyHost, cleanup: () -> Void) {
        switch choice.kind {
        case .simulated:
            return (SimulatedStandbyHost(), {})
        case .qemu:
            let q = QEMUStandby(config: qemuConfig("standby\(serial)"), hot: true, counterAddress: choice.guestCounterAddress,
                                dirtyPages: dirtyPagePolicy(logger: logger, events: events), trackingFallback: trackingFallback(logger: logger))
            return (q, q.cleanup)
        case .libvirt:
            let l = LibvirtStandby(connection: try openLibvirt(), domainName: choice.domainName, counterAddress: choice.guestCounterAddress,
                                   dirtyPages: dirtyPagePolicy(logger: logger, events: events), trackingFallback: trackingFallback(logger: logger))
            return (l, l.cleanup)
        }
    }

    private func openLibvirt() throws -> LibvirtConnection {
        // /run is emptied at boot; QEMU cannot start a protected domain without this directory.
        try PrivateQMP.ensureDirectory()
        do {
            return try LibvirtConnection.open(uri: choice.uri)
        } catch let e as GeminusError {
            var e = e
            if e.fix == nil { e.fix = "start libvirtd (Tools/start-libvirt as root), or pass --uri" }
            throw e
        }
    }

    /// A QEMU the agent starts carries the write-tracking preload library when tracking may be
    /// used and the library is found (`auto` without it falls back to compare, said once).
    private func qemuConfig(_ role: String) -> QEMUGuestConfig {
        var c = QEMUGuestConfig.standard(tag: "geminus-\(choice.vmName)-\(role)-\(getpid())", ramMiB: choice.ramMiB,
                                         kernelPath: choice.kernel!, append: choice.append)
        // The serial console is the guest's output: held until its checkpoint is acknowledged
        // and sent to --output-sink like any packet; so is its NIC's (--nic-bridge).
        c.serialSocketPath = c.serialLogPath + ".sock"
        if choice.nicBridge != nil { c.addNIC(mac: choice.guestMAC) }
        if let n = choice.diskMiB { c.addDisk(sizeBytes: UInt64(n) << 20) }
        if choice.dirtyPages != .compare, let library = WriteTrackingPreload.locate() { c.preloadWriteTracking(library: library) }
        return c
    }

    /// The operator's dirty-page choice; misses found by `--verify-tracking` are logged as
    /// critical and counted in the events, the VM stays protected (the missed pages are sent).
    private func dirtyPagePolicy(logger: Logger, events: EventLog) -> DirtyPagePolicy {
        DirtyPagePolicy(method: choice.dirtyPages, verify: choice.verifyTracking, reprotect: choice.trackingReprotect, onMiss: { verification, message in
            logger.critical("\(message); the next checkpoint is a full copy. Protect this VM with --dirty-pages compare and report it")
            events.emit(.trackingMiss, ["missedPages": verification.missedPages, "verifiedEpochs": verification.epochs,
                                        "epochsWithMisses": verification.epochsWithMisses])
        })
    }

    /// One log line when write tracking was asked for (`auto`) but cannot be had.
    private func trackingFallback(logger: Logger) -> @Sendable (GeminusError) -> Void {
        { error in logger.notice("dirty pages by compare (O(guest RAM) per checkpoint), not write tracking: \(error.message)\(error.fix.map { "; to track writes: \($0)" } ?? "")") }
    }

    /// The enrolment recorded by `geminus enroll` is the operator's statement of intent: say
    /// when the agent protects a domain without one, or with another interval than recorded.
    private func reportEnrollment(of guest: LibvirtGuest, logger: Logger) {
        guard let enrollment = (try? guest.connection.readEnrollment(of: guest.domain)) ?? nil else {
            logger.warning("domain \(choice.domainName) is not enrolled for CA (no <geminus:enrollment> in its metadata): protecting it anyway; record it with `geminus enroll \(choice.domainName) --peer HOST`")
            return
        }
        if enrollment.intervalMilliseconds != choice.intervalMillis {
            logger.notice("domain \(choice.domainName) was enrolled with a \(enrollment.intervalMilliseconds) ms interval; this agent checkpoints every \(choice.intervalMillis) ms (--interval-millis)")
        }
    }
}
