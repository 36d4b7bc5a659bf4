import GeminusReplication

/// Everything that shapes a run besides its faults. The defaults keep one run of 3 s of
/// simulated time at a fraction of a second of real time in a debug build, with epochs,
/// resyncs and takeovers all well exercised.
public struct SimulationConfig: Sendable, Equatable {
    public var seed: UInt64
    /// Simulated time a run lasts.
    public var durationNanos: UInt64
    /// One simulation step: each node reads, ticks and sends once per step.
    public var stepNanos: UInt64 = 1_000_000
    public var primary: PrimaryMachine.Config
    public var secondary: SecondaryMachine.Config
    public var guestRamMiB = 1
    public var dirtyPagesPerSecond = 10_000
    public var outputsPerSecond = 1_000
    /// Whether the guest sends every other output (even sequence numbers) as an Ethernet frame
    /// through its NIC (`offerFrame`) rather than as a console line: both share the node's
    /// output-commit queue and are checked alike.
    public var nicFrames = true
    /// Blocks of 4 KiB of the guest's disk (0: none). Its writes travel in the checkpoints and
    /// the secondary's replica disk (in memory) is written only at commits.
    public var diskBlocks = 64
    /// With a disk: the guest writes one block every this many of its steps (10 per ms).
    public var diskWriteEverySteps = 64
    /// Each side sends a heartbeat after this long without sending (docs/PROTOCOL.md).
    public var heartbeatNanos: UInt64 = 10_000_000
    /// The primary dials again this long after a connection ends or a dial fails.
    public var redialNanos: UInt64 = 20_000_000
    /// A dial with no answer (a partition swallowed it) is given up after this long.
    public var dialTimeoutNanos: UInt64 = 100_000_000
    /// What may be in flight or unread on each link direction (a socket's buffers).
    public var linkCapacityBytes = 2 << 20
    /// The primary's output-commit buffer (`OutputQueue` limit): when full the guest stalls.
    public var outputLimitBytes = 16 << 10
    public var maxFramePayload = 32 << 10
    /// A slow secondary reads at most this many bytes per step; nil reads everything due.
    public var secondaryReadBytesPerStep: Int? = nil
    /// How the pair decides who runs the VM: the witness (a third Corosync node, modelled by
    /// `SimulatedWitness`) unless a run asks for none, to show what happens without it.
    public var arbitration: Arbitration
    /// The modelled Corosync: memberships follow connectivity changes after 50-110 ms (a token
    /// of 50 ms and consensus of 60 ms, scaled down from the real cluster's so runs stay short).
    public var witnessDetectNanos: ClosedRange<UInt64> = 50_000_000...110_000_000
    public var witnessDeliveryNanos: UInt64 = 2_000_000
    /// Whether the primary's lease watches its own messages' delivery (`ringSilenceNanos`), as
    /// the agents do. Off only to show what the rule prevents.
    public var ringLease = true

    /// The arbitration bounds that go with the modelled Corosync (see `ArbitrationTimings`):
    /// a stale membership outlives the other side's by at most the spread of `witnessDetectNanos`;
    /// twice its upper end is the margin the real derivation uses. A fence here is immediate,
    /// so the watch's bound only has to cover a freeze.
    public static let witnessTimings = ArbitrationTimings(staleQuorumNanos: 220_000_000, selfFenceNanos: 20_000_000)

    public init(seed: UInt64, durationNanos: UInt64 = 3_000_000_000,
                primary: PrimaryMachine.Config = .init(epochIntervalNanos: 25_000_000, maxEpochsInFlight: 4,
                                                       peerSilenceNanos: 150_000_000, unprotectAfterNanos: 300_000_000),
                secondary: SecondaryMachine.Config = .init(takeoverAfterNanos: 150_000_000),
                arbitration: Arbitration = .witness(SimulationConfig.witnessTimings)) {
        self.seed = seed
        self.durationNanos = durationNanos
        self.primary = primary
        self.secondary = secondary
        self.arbitration = arbitration
        self.primary.arbitration = arbitration
        self.secondary.arbitration = arbitration
    }

    /// Switches arbitration for both machines.
    public mutating func setArbitration(_ a: Arbitration) {
        arbitration = a
        primary.arbitration = a
        secondary.arbitration = a
    }

    /// Guest steps (one page written each) per simulation step.
    var guestStepsPerStep: Int { max(1, Int(UInt64(dirtyPagesPerSecond) * stepNanos / 1_000_000_000)) }
}
