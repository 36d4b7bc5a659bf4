import Foundation
import Testing
import GeminusCore
import GeminusHypervisor
@testable import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

@Suite(.serialized)
struct QMPClientFakeServerTests {
    @Test func timeoutIsUnknownAndEOFIsClosed() throws {
        let path = NSTemporaryDirectory() + "gq-\(getpid())-fake.qmp"
        // Replies to "query-status" late (after 300 ms, with its id), ignores "hang", drops the
        // connection on "die", and sends an event before answering anything else.
        let server = try FakeQMPServer(path: path) { fd, line in
            let id = line.range(of: #""id":\s*(\d+)"#, options: .regularExpression).map { String(line[$0]).filter(\.isNumber) } ?? "0"
            if line.contains("hang") { return true }
            if line.contains("die") { return false }
            if line.contains("slow") {
                Thread.sleep(forTimeInterval: 0.3)
                FakeQMPServer.write(fd, #"{"return": {"late": true}, "id": \#(id)}"#)
                return true
            }
            FakeQMPServer.write(fd, #"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#)
            FakeQMPServer.write(fd, #"{"return": {"status": "running"}, "id": \#(id)}"#)
            return true
        }
        defer { server.stop() }
        let qmp = try QMPClient(socketPath: path)
        defer { qmp.close() }
        #expect(qmp.greeting.contains("QMP"))

        let r = try qmp.execute("query-status") as? [String: Any]
        #expect(r?["status"] as? String == "running")
        #expect(qmp.events.map(\.name) == ["STOP"])

        // Timeout: state unknown, error code .timeout.
        #expect(throws: GeminusError.self) { try qmp.execute("slow", timeout: 0.05) }
        do { try qmp.execute("hang", timeout: 0.1); Issue.record("hang did not time out") } catch {
            #expect(error.code == .timeout)
        }
        #expect(qmp.state == .unknown)
        // The late reply to "slow" arrives with an old id and is skipped; the next call works.
        Thread.sleep(forTimeInterval: 0.35)
        let again = try qmp.execute("query-status") as? [String: Any]
        #expect(again?["status"] as? String == "running")
        #expect(qmp.state == .connected)

        // EOF: QEMU gone, state closed, distinct from a timeout.
        do { try qmp.execute("die"); Issue.record("die did not fail") } catch {
            #expect(error.code == .hypervisor)
            #expect(error.message.contains("closed the QMP connection"))
        }
        #expect(qmp.state == .closed)
    }

    @Test func connectGivesUpAfterBoundedTime() {
        let path = NSTemporaryDirectory() + "gq-\(getpid())-nobody.qmp"
        let t0 = Monotonic.nanos()
        do {
            _ = try QMPClient(socketPath: path, connectTimeout: 0.2)
            Issue.record("connected to a socket nobody serves")
        } catch {
            #expect(error.code == .connectionFailed)
        }
        #expect(Monotonic.nanos() - t0 < 2_000_000_000)
    }

    @Test func argvUsesTheVerifiedFlags() {
        var c = QEMUGuestConfig(ramMiB: 64, kernelPath: "/k.elf", append: "pages=64", ramFilePath: "/dev/shm/x.ram",
                                qmpSocketPath: "/tmp/x.qmp", serialLogPath: "/tmp/x.serial")
        let a = QEMULauncher.arguments(for: c).joined(separator: " ")
        #expect(a == "-accel tcg -machine pc,memory-backend=pc.ram -m 64 -object memory-backend-file,id=pc.ram,size=64M,mem-path=/dev/shm/x.ram,share=on -nodefaults -no-user-config -display none -kernel /k.elf -append pages=64 -chardev file,id=s0,path=/tmp/x.serial -device isa-serial,chardev=s0 -qmp unix:/tmp/x.qmp,server=on,wait=off")
        c.incomingDefer = true
        #expect(QEMULauncher.arguments(for: c).suffix(4) == ["-incoming", "defer", "-global", "migration.send-configuration=off"])
        #expect(c.pageCount == 16384)
    }
}

@Suite(.serialized, .enabled(if: VMEnv.enabled, VMEnv.skipReason))
struct QEMUGuestTests {
    @Test func qmpRoundTripAndErrors() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        let guest = try QEMUGuest.launch(VMEnv.config(kernel: kernel, role: "qmp"), counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        let status = try guest.qmp.execute("query-status") as? [String: Any]
        #expect(status?["status"] as? String == "running")
        do { try guest.qmp.execute("no-such-command"); Issue.record("unknown command accepted") } catch {
            #expect(error.code == .hypervisor)
            #expect(error.message.hasPrefix("QMP no-such-command failed: CommandNotFound: "))
        }
        do { try guest.qmp.execute("xen-save-devices-state", arguments: ["filename": "/nonexistent-dir/x"]); Issue.record("bad save accepted") } catch {
            #expect(error.message.hasPrefix("QMP xen-save-devices-state failed: GenericError: "))
        }
        try guest.qmp.execute("stop")
        let stopped = try guest.qmp.execute("query-status") as? [String: Any]
        #expect(stopped?["status"] as? String == "paused")
        #expect(guest.qmp.events.contains { $0.name == "STOP" })
        try guest.qmp.execute("cont")

        // QEMU killed: the next call reports "closed", not a timeout.
        guest.crash()
        do { try guest.qmp.execute("query-status"); Issue.record("dead QEMU answered") } catch {
            #expect(error.code == .hypervisor)
        }
        #expect(guest.qmp.state == .closed)
    }

    @Test func pauseFreezesTheCounterAndResumeUnfreezesIt() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        let guest = try QEMUGuest.launch(VMEnv.config(kernel: kernel, role: "pause"), counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        try VMEnv.waitBooted(guest.memory)
        try guest.pause()
        let c1 = guest.progressCounter
        VMEnv.sleep(ms: 300)
        #expect(guest.progressCounter == c1)
        try guest.resume()
        VMEnv.sleep(ms: 300)
        #expect(guest.progressCounter > c1)
    }

    @Test func captureReturnsExactlyTheChangedPages() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        let guest = try QEMUGuest.launch(VMEnv.config(kernel: kernel, role: "capture"), counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        try VMEnv.waitBooted(guest.memory)
        let buffer = CheckpointBuffer(limitPages: guest.pageCount)
        let snapshot = try PageMemory(pageCount: guest.pageCount)

        try guest.pause()
        try guest.capture(full: true, into: buffer)
        #expect(buffer.isFull && buffer.pageCount == guest.pageCount)
        #expect(!buffer.deviceState.isEmpty)
        memcpy(snapshot.base, guest.memory.base, guest.memory.byteCount)
        try guest.resume()

        for round in 0..<3 {
            VMEnv.sleep(ms: 30 + 40 * round)
            try guest.pause()
            var expected: [Int] = []
            for p in 0..<guest.pageCount where memcmp(guest.memory.page(p), snapshot.page(p), GuestPage.size) != 0 {
                expected.append(p)
            }
            try guest.capture(full: false, into: buffer)
            #expect(!buffer.isFull)
            #expect(buffer.pageIndices == expected)
            #expect(expected.contains(0x200000 / GuestPage.size), "the status page changed")
            for i in 0..<buffer.pageCount {
                #expect(memcmp(buffer.contents(at: i), guest.memory.page(buffer.pageIndices[i]), GuestPage.size) == 0)
            }
            #expect(!buffer.deviceState.isEmpty)
            memcpy(snapshot.base, guest.memory.base, guest.memory.byteCount)
            // Nothing changes while paused: an immediate second capture is empty.
            try guest.capture(full: false, into: buffer)
            #expect(buffer.pageCount == 0)
            try guest.resume()
        }
        let t = try #require(guest.lastTimings)
        print("capture timings (\(VMEnv.ramMiB) MiB): stop \(Double(t.stopNanos) / 1e6) ms, find+copy \(Double(t.findCopyNanos) / 1e6) ms, save \(Double(t.saveNanos) / 1e6) ms, cont \(Double(t.contNanos) / 1e6) ms, device state \(t.deviceStateBytes) B")
        // QMP latency alone, without the agent's page compare between stop and cont.
        var running: [UInt64] = [], paused: [UInt64] = []
        for _ in 0..<20 {
            var t0 = Monotonic.nanos(); try guest.qmp.execute("query-status"); running.append(Monotonic.nanos() - t0)
            try guest.pause()
            t0 = Monotonic.nanos(); try guest.qmp.execute("query-status"); paused.append(Monotonic.nanos() - t0)
            try guest.resume()
        }
        print("QMP query-status round trip: median \(VMEnv.median(running)) ms with the guest running, \(VMEnv.median(paused)) ms paused")

    }

    @Test(arguments: [(true, IncomingTransport.fdPipe), (false, .fdPipe), (true, .execCat)])
    func replicateKillAndResumeOnStandby(hot: Bool, transport: IncomingTransport) throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        let primary = try QEMUGuest.launch(VMEnv.config(kernel: kernel, role: "primary"), counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { primary.shutdown() }
        var standbyConfig = VMEnv.config(kernel: kernel, role: hot ? "hot" : "cold")
        standbyConfig.append = primary.process.config.append
        let standby = QEMUStandby(config: standbyConfig, hot: hot, transport: transport, counterAddress: QEMUGuest.tinyGuestCounterAddress)
        defer { standby.cleanup() }
        let replica = try standby.makeReplicaMemory(pageCount: primary.pageCount)
        if hot { #expect(standby.standbyPID != nil) }
        try VMEnv.waitBooted(primary.memory)

        let buffer = CheckpointBuffer(limitPages: primary.pageCount)
        var deviceState: [UInt8] = []
        var checkpointCounter: UInt64 = 0
        var timings: [CaptureTimings] = []
        for epoch in 0..<20 {
            VMEnv.sleep(ms: 25)
            try primary.pause()
            try primary.capture(full: epoch == 0, into: buffer)
            // Apply page by page, as the secondary's replica does on commit.
            for i in 0..<buffer.pageCount {
                replica.page(buffer.pageIndices[i]).copyMemory(from: buffer.contents(at: i), byteCount: GuestPage.size)
            }
            deviceState = buffer.deviceState
            checkpointCounter = primary.progressCounter
            if epoch == 19 {
                #expect(replica.contentsEqual(primary.memory), "the replica holds the primary's memory at the checkpoint")
            }
            try primary.resume()
            if epoch > 0, let t = primary.lastTimings { timings.append(t) }
        }
        let bootMarker = replica.loadU64(at: VMEnv.bootMarkerAddress)
        #expect(replica.loadU64(at: 0x200008) == checkpointCounter)

        // The primary dies after running on past its last checkpoint.
        VMEnv.sleep(ms: 20)
        primary.crash()
        #expect(!primary.process.isRunning)
        #expect(replica.loadU64(at: 0x200008) == checkpointCounter, "the replica holds the checkpoint, not the primary's later state")

        let resumed = try standby.resumeGuest(memory: replica, deviceState: deviceState)
        defer { resumed.shutdown() }
        let first = resumed.progressCounter
        #expect(first >= checkpointCounter)
        #expect(first < checkpointCounter + 1_000_000, "continues from the checkpoint, not from a reboot or the primary's later state")
        VMEnv.sleep(ms: 300)
        let later = resumed.progressCounter
        #expect(later > first, "the resumed guest runs")
        #expect(resumed.memory.loadU64(at: VMEnv.bootMarkerAddress) == bootMarker, "same boot: the guest was resumed, not rebooted")
        let log = resumed.process.stderrTail()
        if !log.isEmpty { print("standby QEMU stderr: \(log)") }
        let status = try resumed.qmp.execute("query-status") as? [String: Any]
        #expect(status?["status"] as? String == "running")

        // The resumed guest can be protected in turn: a full then a delta capture work.
        try resumed.pause()
        try resumed.capture(full: true, into: buffer)
        try resumed.resume()
        VMEnv.sleep(ms: 25)
        try resumed.pause()
        try resumed.capture(full: false, into: buffer)
        try resumed.resume()
        #expect(buffer.pageCount > 0 && !buffer.deviceState.isEmpty)

        let r = try #require(standby.lastResumeTimings)
        #expect(r.hot == hot)
        print("""
            \(hot ? "hot" : "cold") standby (\(transport)), \(VMEnv.ramMiB) MiB, \(timings.count) delta epochs: median pause \(VMEnv.median(timings.map(\.pauseNanos))) ms \
            (stop \(VMEnv.median(timings.map(\.stopNanos))), find+copy \(VMEnv.median(timings.map(\.findCopyNanos))), \
            save \(VMEnv.median(timings.map(\.saveNanos))), cont \(VMEnv.median(timings.map(\.contNanos))) ms), \
            median pages \(timings.map(\.pages).sorted()[timings.count / 2]), device state \(deviceState.count) B; \
            counter at checkpoint \(checkpointCounter), right after resume \(first), 300 ms later \(later); \
            resume \(Double(r.totalNanos) / 1e6) ms (write state \(Double(r.writeStateNanos) / 1e6), start \(Double(r.startNanos) / 1e6), \
            load \(Double(r.loadNanos) / 1e6) [migrate-incoming \(Double(r.incomingCommandNanos) / 1e6), \(r.polls) polls], cont \(Double(r.contNanos) / 1e6) ms, \(r.contRetries) cont retries)
            """)
    }

    /// The real path: every capture goes through the wire format (CheckpointEncoder → frames →
    /// FrameDecoder → Replica, which applies only whole verified epochs into the replica file
    /// a hot standby QEMU already maps), then failover from the replica's committed state.
    @Test func replicateThroughTheWireFormatAndFailOver() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        let primary = try QEMUGuest.launch(VMEnv.config(kernel: kernel, role: "wprimary", append: "pages=200"), counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { primary.shutdown() }
        let standby = QEMUStandby(config: VMEnv.config(kernel: kernel, role: "wstandby", append: "pages=200"), hot: true,
                                  counterAddress: QEMUGuest.tinyGuestCounterAddress)
        defer { standby.cleanup() }
        let replica = Replica(memory: try standby.makeReplicaMemory(pageCount: primary.pageCount))
        let encoder = try CheckpointEncoder(pageCount: primary.pageCount, maxFramePayload: 64 << 10)
        try VMEnv.waitBooted(primary.memory)

        let buffer = CheckpointBuffer(limitPages: primary.pageCount)
        var epoch = Epoch.none
        var checkpointCounter: UInt64 = 0
        var wireBytes = 0
        for i in 0..<10 {
            VMEnv.sleep(ms: 25)
            try primary.pause()
            try primary.capture(full: i == 0, into: buffer)
            checkpointCounter = primary.progressCounter
            try primary.resume()
            let base = epoch
            epoch = epoch.next
            var frames: [[UInt8]] = []
            let stats = encoder.encode(buffer, epoch: epoch, generation: Generation(1), baseEpoch: base) { frames.append($0) }
            wireBytes += stats.wireBytes
            var decoder = FrameDecoder()
            var verdict: Replica.Outcome?
            for f in frames {
                decoder.feed(f)
                while let frame = try decoder.next() {
                    let outcome = replica.accept(frame)
                    if outcome != .staged { verdict = outcome }
                }
            }
            guard case .committed(let e, _) = verdict else {
                Issue.record("epoch \(epoch) not committed: \(String(describing: verdict))")
                return
            }
            #expect(e == epoch)
        }
        primary.crash()
        #expect(replica.memory.loadU64(at: 0x200008) == checkpointCounter)
        let resumed = try standby.resumeGuest(memory: replica.memory, deviceState: replica.committedDeviceState)
        defer { resumed.shutdown() }
        let first = resumed.progressCounter
        VMEnv.sleep(ms: 200)
        #expect(first >= checkpointCounter && resumed.progressCounter > first)
        print("wire path: 10 epochs, \(wireBytes) wire bytes, counter at checkpoint \(checkpointCounter), resumed at \(first), resume \(Double(standby.lastResumeTimings?.totalNanos ?? 0) / 1e6) ms")
    }

    @Test func noFilesLeftBehind() {
        #expect(VMEnv.leftoverShmFiles() == [])
    }
}
