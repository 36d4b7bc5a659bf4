import GeminusCore

/// The VM as the primary's epoch loop sees it. Implemented by the simulated VM, by a QEMU the
/// agent starts (`QEMUGuest`) and by a libvirt domain (`LibvirtGuest`); nothing above this seam
/// knows which it drives. Four small parts, each what one concern of the node needs.
public typealias ProtectedGuest = CheckpointedGuest & GuestLifecycle & GuestDevices & GuestReports

/// What the epoch loop pauses and copies.
public protocol CheckpointedGuest: AnyObject, Sendable {
    var pageCount: Int { get }
    /// Stops the vCPUs and device emulation, so memory and device state hold still.
    func pause() throws(GeminusError)
    func resume() throws(GeminusError)
    /// While paused: copies every page written since the previous capture (every page when
    /// `full`) and the device state into `buffer`, and starts a new written set.
    func capture(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError)
    /// Whether `captureLive` copies without pausing (a round of the live first copy). A guest
    /// that cannot (a verifying finder, whose comparison would race the running guest) gets its
    /// first copy paused.
    var supportsLiveCopy: Bool { get }
    /// While the guest runs: copies every page (when `full`) or those written since the last
    /// capture into `buffer`, marked live (`isLive`, no device state), and starts a new written
    /// set. A page the guest writes during the copy may be torn here; it is written again, so
    /// the next capture carries it whole.
    func captureLive(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError)
    /// After a live round: a device's own first copy is still under way (a disk streaming to
    /// the secondary through its mirror), so the live copy cannot end with the pause yet.
    var liveCopyDevicesPending: Bool { get }
    /// The full copy can only be taken live: a disk too large to carry in one paused epoch
    /// streams while the guest runs. Such a guest needs `supportsLiveCopy`.
    var fullCopyMustBeLive: Bool { get }
    /// The live copy under way was abandoned (the link to the secondary went): devices stop
    /// keeping what they kept for it.
    func abandonLiveCopy()
    /// The guest's own progress counter (the test guests keep one in RAM), for reports.
    var progressCounter: UInt64 { get }
    /// How the last capture's time divided (nil when the guest does not measure it): the
    /// benchmark and status show the parts of the pause, not only its sum.
    var lastCaptureParts: CaptureParts? { get }
}

/// How the guest ends here: stopped for good, or let go.
public protocol GuestLifecycle: AnyObject, Sendable {
    /// Stops the guest for good: it must not run again here (handed over, or a guest the
    /// agent started itself and takes down with it).
    func shutdown()
    /// After `shutdown`: the guest is known to run no more here (its QEMU has exited, its domain
    /// is off). A self-fenced primary tells the witness so only when this is true: a wrong
    /// "stopped" would let the secondary resume beside a live copy.
    var stoppedForGood: Bool { get }
    /// Lets go of the guest when the agent stops without handing it over: a guest the agent
    /// started is stopped (`shutdown`), a libvirt domain the operator runs is left running
    /// (unprotected) with its vCPUs resumed. Idempotent.
    func detach()
}

/// The guest's devices that produce output or take input outside the checkpoint stream.
public protocol GuestDevices: AnyObject, Sendable {
    /// Whether output the guest produced waits for room in the output port and the device would
    /// lose it if the guest ran on (a NIC whose backend queue is finite). Devices that stall
    /// the guest themselves (a serial port) do not count.
    var outputStalled: Bool { get }
    /// Takes into the output port what the guest's devices produced so far (as at a pause).
    func drainOutput()
    /// Where frames from the host's network for this guest go, if it has a NIC (wired after a
    /// takeover, so the resumed guest answers at once).
    var inboundFrames: (@Sendable ([UInt8]) -> Void)? { get }
    /// A replicated disk records its writes (for the next checkpoint) only while `holding` says
    /// output is held for a secondary; wired by whoever gives the guest its output port.
    func collectDiskWrites(while holding: @escaping @Sendable () -> Bool)
}

/// What the guest says about itself.
public protocol GuestReports: AnyObject, Sendable {
    /// What its checkpoints are valid for (machine type, emulator, sizes); empty = not known.
    var platform: GuestPlatform { get }
    /// What `geminus status` shows about the guest itself: its kind, domain, the dirty-page
    /// method in use. Cheap (no I/O): read at every progress report.
    var statusReport: [String: String] { get }
    /// What a takeover report says about the guest just resumed (its process, its domain; a test
    /// guest adds the output history its checkpoint stands behind). Read once, right after resume.
    var takeoverFacts: [String: JSONValue] { get }
}

/// The parts of one capture while the vCPUs were stopped.
public struct CaptureParts: Sendable, Equatable {
    /// Finding and copying the written pages.
    public var dirtyPagesNanos: UInt64
    /// Saving the device state (vCPUs and device models).
    public var deviceStateNanos: UInt64

    public init(dirtyPagesNanos: UInt64, deviceStateNanos: UInt64) {
        self.dirtyPagesNanos = dirtyPagesNanos
        self.deviceStateNanos = deviceStateNanos
    }
}

extension CheckpointedGuest {
    public var lastCaptureParts: CaptureParts? { nil }
    public var supportsLiveCopy: Bool { false }
    public var liveCopyDevicesPending: Bool { false }
    public var fullCopyMustBeLive: Bool { false }
    public func abandonLiveCopy() {}
    /// Without a live path: a paused copy, so the round is exact (and the guest feels it).
    public func captureLive(full: Bool, into buffer: CheckpointBuffer) throws(GeminusError) {
        try pause()
        do {
            try capture(full: full, into: buffer)
        } catch {
            try? resume()
            throw error
        }
        try resume()
        buffer.deviceState = []
        buffer.isLive = true
    }
}

extension GuestLifecycle {
    public func detach() { shutdown() }
    /// Unknown unless the guest says: never claim a stop that was not checked.
    public var stoppedForGood: Bool { false }
}

extension GuestDevices {
    public var outputStalled: Bool { false }
    public func drainOutput() {}
    public var inboundFrames: (@Sendable ([UInt8]) -> Void)? { nil }
    public func collectDiskWrites(while holding: @escaping @Sendable () -> Bool) {}
}

extension GuestReports {
    public var platform: GuestPlatform { GuestPlatform() }
    public var statusReport: [String: String] { [:] }
    public var takeoverFacts: [String: JSONValue] { [:] }
}

/// Where guest output (network packets) goes. `offer` returns false when the output buffer is
/// full: the guest must stall and offer again, never drop (promise S2 bounds, docs/ARCHITECTURE.md).
public protocol GuestOutputPort: Sendable {
    /// A console line (or a simulated guest's packet).
    func offer(_ packet: [UInt8]) -> Bool
    /// An Ethernet frame the guest's NIC transmitted. Held like a console line; on release it
    /// goes out on the host's network instead of to the console sink.
    func offerFrame(_ frame: [UInt8]) -> Bool
}

extension GuestOutputPort {
    /// Ports that do not tell the two apart (tests, the simulator) take frames as packets.
    public func offerFrame(_ frame: [UInt8]) -> Bool { offer(frame) }
}

/// The secondary's side: it provides the memory the replica lives in, and turns the last
/// committed checkpoint into a running guest on failover.
public protocol StandbyHost: Sendable {
    /// The guest size this standby is set up for, or nil if it takes any. A primary with
    /// another size is refused at the handshake, with the reason, instead of being dropped.
    var expectedPageCount: Int? { get }
    /// What the standby can resume (machine type, emulator, sizes); empty = not known.
    var platform: GuestPlatform { get }
    /// The standby's health for `geminus status`, e.g. `["standby": "ready"]`. May do I/O with
    /// short timeouts (asks QEMU and libvirt): called off the apply loop, about once a second.
    func checkHealth() -> [String: String]
    func makeReplicaMemory(pageCount: Int) throws(GeminusError) -> PageMemory
    /// The replica of the guest's disk, if it has a replicated one (written at commits).
    func makeReplicaDisk() throws(GeminusError) -> (any ReplicaDisk)?
    /// Starts the guest from `memory` (already holding the committed pages) and the committed
    /// device state. The returned guest is running and is now the one to protect.
    func resume(memory: PageMemory, deviceState: [UInt8], output: any GuestOutputPort) throws(GeminusError) -> any ProtectedGuest
}

extension StandbyHost {
    /// Standbys without a replicated disk.
    public func makeReplicaDisk() throws(GeminusError) -> (any ReplicaDisk)? { nil }
}

extension StandbyHost {
    public var expectedPageCount: Int? { nil }
    public var platform: GuestPlatform { GuestPlatform() }
    public func checkHealth() -> [String: String] { [:] }
}

