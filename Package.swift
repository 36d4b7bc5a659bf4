// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "geminus",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "geminus", targets: ["geminus"]),
        .library(name: "GeminusCore", targets: ["GeminusCore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        // System libraries, found through pkg-config; `providers` names the Debian package
        // so a missing library is reported with the command that installs it. Hints only: the
        // list is Tools/packages.txt (its build group), which Tools/install-deps installs.
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CXXHash", pkgConfig: "libxxhash", providers: [.apt(["libxxhash-dev"])]),
        .systemLibrary(name: "CLibCrypto", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CLibvirt", pkgConfig: "libvirt-qemu", providers: [.apt(["libvirt-dev"])]),
        // Corosync's client libraries for the HA path (membership, quorum, node names).
        .systemLibrary(name: "CCorosync", pkgConfig: "libcpg", providers: [.apt(["libcpg-dev", "libquorum-dev", "libcmap-dev"])]),
        // Small C helpers where Swift cannot reach the CPU instruction (CRC32C) cheaply.
        .target(name: "CGeminusSupport"),

        .target(
            name: "GeminusCore",
            dependencies: ["CLZ4", "CXXHash", "CGeminusSupport"]
        ),
        .target(
            name: "GeminusHypervisor",
            dependencies: ["GeminusCore"]
        ),
        .target(
            // QEMU driven directly over QMP: the real guest behind the hypervisor seam.
            name: "GeminusQEMU",
            dependencies: ["GeminusCore", "GeminusHypervisor", "CGeminusSupport"]
        ),
        .target(
            // libvirt's C API: connections, domains, their XML, and the checks for enrolment.
            name: "GeminusLibvirt",
            dependencies: ["CLibvirt", "GeminusCore"]
        ),
        .target(
            // A libvirt domain behind the hypervisor seam: the checkpoint cycle over the domain's
            // private QMP socket, and a hot standby started through libvirt.
            name: "GeminusLibvirtGuest",
            dependencies: ["GeminusCore", "GeminusHypervisor", "GeminusQEMU", "GeminusLibvirt"]
        ),
        .target(
            // Fixtures and harnesses for tests, `geminus demo` and `geminus bench`, never for production
            // targets: the tiny test guest (built, and as two libvirt domains), agents as child processes.
            name: "GeminusTestSupport",
            dependencies: ["GeminusCore", "GeminusLibvirt", "GeminusQEMU", "GeminusNode"]
        ),
        .target(
            // `geminus demo`'s script: by default the Linux guest through the source tree's
            // Tools/guest-linux/kill-test (its report as the verdict); with --tiny two agent
            // processes on loopback, the primary killed at a random moment, the checks (resumed
            // checkpoint, output commit, failover bound, one copy); libvirtd started by the
            // source tree's Tools/ scripts when it does not answer.
            name: "GeminusDemo",
            dependencies: ["GeminusCore", "GeminusHypervisor", "GeminusQEMU", "GeminusTransport", "GeminusLibvirt", "GeminusTestSupport"]
        ),
        .target(
            // `geminus bench`: checkpoints of a real guest per method, QEMU's own migration
            // downtime beside them, and the scaling of the dirty-page part with guest RAM.
            name: "GeminusBench",
            dependencies: ["GeminusCore", "GeminusHypervisor", "GeminusQEMU", "GeminusTransport",
                           .product(name: "Histogram", package: "hdrhistogram-swift")]
        ),
        .target(
            // The cluster seam (membership, quorum, per-node published state): Corosync and simulated.
            name: "GeminusCluster",
            dependencies: ["CCorosync", "GeminusCore"]
        ),
        .target(
            // The HA path as a state machine without I/O: fencing, placement, restart decisions.
            name: "GeminusHA",
            dependencies: ["GeminusCluster", "GeminusCore"]
        ),
        .target(
            // The HA node's real world: Corosync, libvirt, fence agents, the status file and
            // request files. Apart from GeminusHA so that the HA logic and its tests need none of them.
            name: "GeminusHAHost",
            dependencies: ["GeminusHA", "GeminusCluster", "GeminusLibvirt", "GeminusCore", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "GeminusTransport",
            dependencies: ["GeminusCore", "CLibCrypto", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "GeminusReplication",
            dependencies: ["GeminusCore"]
        ),
        .target(
            // The whole pair in one process under one seeded generator: the real state
            // machines, encoder, decoder, replica and output queue over a simulated clock, link
            // and guest, with faults injected and the promises checked after every step.
            name: "GeminusSimulation",
            dependencies: ["GeminusCore", "GeminusHypervisor", "GeminusReplication", "GeminusNode"]
        ),
        .target(
            // One driver per role (`PrimaryNode`, `SecondaryNode`): the machines and every rule
            // around them, over small seams (clock, peer link, dialer/acceptor, witness, lease,
            // output destination). The agent and the simulator both step these.
            name: "GeminusNode",
            dependencies: ["GeminusCore", "GeminusHypervisor", "GeminusReplication",
                           .product(name: "Histogram", package: "hdrhistogram-swift")]
        ),
        .target(
            name: "GeminusAgent",
            dependencies: [
                "GeminusCore", "GeminusHypervisor", "GeminusTransport", "GeminusReplication", "GeminusCluster", "CGeminusSupport", "GeminusNode",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        .target(
            // The guest kinds `geminus agent` can protect (simulated, QEMU it starts, a libvirt
            // domain) behind the runtime's `GuestHost` seam.
            name: "GeminusAgentGuests",
            dependencies: ["GeminusAgent", "GeminusCore", "GeminusHypervisor", "GeminusQEMU", "GeminusLibvirt", "GeminusLibvirtGuest",
                           .product(name: "Logging", package: "swift-log")]
        ),
        .executableTarget(
            name: "geminus",
            dependencies: [
                "GeminusAgent", "GeminusAgentGuests", "GeminusNode", "GeminusCore", "GeminusHypervisor", "GeminusTransport", "GeminusQEMU", "GeminusLibvirt",
                "GeminusLibvirtGuest", "GeminusBench", "GeminusSimulation",
                "GeminusCluster", "GeminusHA", "GeminusHAHost", "GeminusDemo", "GeminusTestSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "geminus-bench",
            dependencies: [
                "GeminusCore", "GeminusHypervisor", "GeminusBench",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Bench/geminus-bench"
        ),
        .testTarget(
            name: "GeminusCoreTests",
            dependencies: ["GeminusCore", "GeminusHypervisor"]
        ),
        .testTarget(
            name: "GeminusReplicationTests",
            dependencies: ["GeminusReplication", "GeminusCore", "GeminusHypervisor"]
        ),
        .testTarget(
            name: "GeminusSimulationTests",
            dependencies: ["GeminusSimulation", "GeminusReplication", "GeminusCore", "GeminusHypervisor"],
            // The scenario files are read from the source tree (#filePath), not bundled.
            exclude: ["scenarios"]
        ),
        .testTarget(
            name: "GeminusQEMUTests",
            dependencies: ["GeminusQEMU", "GeminusCore", "GeminusHypervisor", "CGeminusSupport"]
        ),
        .testTarget(
            name: "GeminusLibvirtTests",
            dependencies: ["GeminusLibvirt", "GeminusLibvirtGuest", "GeminusQEMU", "GeminusHypervisor", "GeminusCore"]
        ),
        .testTarget(
            name: "GeminusHATests",
            dependencies: ["GeminusHA", "GeminusHAHost", "GeminusCluster", "GeminusCore"],
            // Read from the source tree by ScenarioTests (and rewritten there on request).
            exclude: ["scenarios"]
        ),
        .testTarget(
            name: "GeminusTransportTests",
            dependencies: ["GeminusTransport", "GeminusCore", "GeminusTestSupport"]
        ),
        .testTarget(
            name: "GeminusIntegrationTests",
            // Depends on the executable so `swift test` builds it: these tests run it as real processes.
            dependencies: ["geminus", "GeminusAgent", "GeminusNode", "GeminusCore", "GeminusHypervisor", "GeminusTransport", "GeminusLibvirt", "GeminusLibvirtGuest", "GeminusTestSupport",
                           "GeminusCluster", "GeminusReplication", "GeminusDemo"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
