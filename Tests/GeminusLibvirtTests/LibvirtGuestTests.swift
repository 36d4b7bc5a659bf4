import Foundation
import Testing
import GeminusCore
import GeminusHypervisor
import GeminusLibvirt
import GeminusLibvirtGuest
import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// LibvirtGuest / LibvirtStandby on real libvirt domains running the tiny guest.
@Suite(.serialized, .enabled(if: LibvirtEnv.enabled, LibvirtEnv.skipReason))
struct LibvirtGuestTests {
    static let statusMagic: UInt64 = 0x47454D494E555331
    static let bootMarkerAddress = 0x200020

    static func waitBooted(_ memory: PageMemory, timeout: Double = 20) throws {
        let deadline = Monotonic.nanos() + UInt64(timeout * 1e9)
        while memory.loadU64(at: 0x200000) != statusMagic || memory.loadU64(at: 0x200008) == 0 {
            guard Monotonic.nanos() < deadline else {
                throw GeminusError(.timeout, "the tiny guest did not boot within \(timeout) s")
            }
            Monotonic.sleep(nanos: 5_000_000)
        }
    }

    static func sleep(ms: Int) { Monotonic.sleep(nanos: UInt64(ms) * 1_000_000) }

    static func ms(_ xs: [UInt64]) -> String {
        guard !xs.isEmpty else { return "-" }
        return String(format: "%.2f", Double(xs.sorted()[xs.count / 2]) / 1e6)
    }

    static func report(_ what: String, _ timings: [CaptureTimings]) {
        FileHandle.standardError.write(Data("""
            libvirt-guest \(what): \(timings.count) delta captures, median pause \(ms(timings.map(\.pauseNanos))) ms \
            (stop \(ms(timings.map(\.stopNanos))), find+copy \(ms(timings.map(\.findCopyNanos))), \
            save \(ms(timings.map(\.saveNanos))), cont \(ms(timings.map(\.contNanos))) ms), \
            median pages \(timings.map(\.pages).sorted()[timings.count / 2]), device state \(timings.last?.deviceStateBytes ?? 0) B\n
            """.utf8))
    }

    /// libvirt follows the private monitor's STOP/RESUME events asynchronously (its own
    /// monitor thread): right after our `cont` it may still say paused for a moment. Waits up
    /// to 2 s for `state`, reports the lag on stderr, and returns whether it was reached.
    static func libvirtReaches(_ state: LibvirtDomainState, _ conn: LibvirtConnection, _ domain: LibvirtDomain, _ what: String) throws -> Bool {
        let start = Monotonic.nanos()
        while true {
            if try conn.state(of: domain).state == state {
                FileHandle.standardError.write(Data("libvirt-state \(what): \(state) after \(String(format: "%.1f", Double(Monotonic.nanos() - start) / 1e6)) ms\n".utf8))
                return true
            }
            if Monotonic.nanos() - start > 2_000_000_000 { return false }
            sleep(ms: 1)
        }
    }

    static func kernel() -> String? {
        switch LibvirtEnv.guestELF {
        case .success(let p): return p
        case .failure(let e): Issue.record("cannot build the tiny guest: \(e)"); return nil
        }
    }

    @Test func attachCaptureDetachAndShutdown() throws {
        guard let conn = LibvirtEnv.connect(), let kernel = Self.kernel() else { return }
        let name = LibvirtEnv.uniqueName("lg")
        defer {
            LibvirtEnv.cleanUp(conn, name)
            try? conn.close()
        }
        let xml = LibvirtEnv.domainXML(name: name, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(name).serial")
        #expect(CAEnrollmentCheck(xml: xml).problems == [])
        let domain = try conn.defineDomain(xml: xml)
        try conn.start(domain)

        let guest = try LibvirtGuest.attach(connection: conn, domainName: name, counterAddress: QEMUGuest.tinyGuestCounterAddress)
        var detached = false
        defer { if !detached { guest.shutdown() } }
        #expect(guest.domainName == name)
        #expect(guest.pageCount == 32 << 8)
        #expect(guest.ramFilePath.hasPrefix("/dev/shm/vmram/"), "\(guest.ramFilePath)")
        if let pid = guest.qemuPID { #expect(kill(pid, 0) == 0) } else { Issue.record("no QEMU pid") }
        try Self.waitBooted(guest.memory)

        let buffer = CheckpointBuffer(limitPages: guest.pageCount)
        var timings: [CaptureTimings] = []
        var last: UInt64 = 0
        for epoch in 0..<30 {
            Self.sleep(ms: 20)
            try guest.pause()
            if epoch == 0 {
                // libvirt follows the private monitor's STOP event.
                #expect(try Self.libvirtReaches(.paused, conn, domain, "after private stop"))
            }
            try guest.capture(full: epoch == 0, into: buffer)
            let counter = guest.progressCounter
            try guest.resume()
            #expect(!buffer.deviceState.isEmpty)
            #expect(buffer.isFull == (epoch == 0))
            if epoch == 0 {
                #expect(buffer.pageCount == guest.pageCount)
            } else {
                #expect(buffer.pageCount > 0 && buffer.pageCount < guest.pageCount / 4, "a delta holds the written pages, not all: \(buffer.pageCount)")
                timings.append(try #require(guest.lastTimings))
            }
            #expect(counter > last, "the counter advances between captures")
            last = counter
        }
        #expect(try Self.libvirtReaches(.running, conn, domain, "after private cont"))
        Self.report("attach (32 MiB, pages=8)", timings)

        // detach leaves the domain running, even when it was paused, and is idempotent.
        try guest.pause()
        guest.detach()
        guest.detach()
        detached = true
        #expect(try Self.libvirtReaches(.running, conn, domain, "after detach"))
        let a = guest.progressCounter
        Self.sleep(ms: 100)
        #expect(guest.progressCounter > a, "still running after detach")

        // Attaching again works (the stale device-state fdset is removed first); shutdown destroys.
        let again = try LibvirtGuest.attach(connection: conn, domainName: name, counterAddress: QEMUGuest.tinyGuestCounterAddress)
        try again.pause()
        try again.capture(full: true, into: buffer)
        try again.resume()
        #expect(!buffer.deviceState.isEmpty)
        let fdsets = try again.qmp.execute("query-fdsets") as? [[String: Any]] ?? []
        let ours = fdsets.filter { (($0["fds"] as? [[String: Any]]) ?? []).contains { $0["opaque"] as? String == DeviceStateFD.opaque } }
        #expect(ours.count == 1, "one device-state fdset: \(fdsets)")
        again.shutdown()
        again.shutdown()
        #expect(try conn.state(of: domain).state == .shutOff)
    }

    @Test func attachRefusesADomainWithoutPrivateQMPOrNotRunning() throws {
        guard let conn = LibvirtEnv.connect(), let kernel = Self.kernel() else { return }
        let name = LibvirtEnv.uniqueName("lr")
        defer {
            LibvirtEnv.cleanUp(conn, name)
            try? conn.close()
        }
        let xml = LibvirtEnv.domainXML(name: name, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(name).serial")
        let domain = try conn.defineDomain(xml: xml)
        #expect { try LibvirtGuest.attach(connection: conn, domainName: name, counterAddress: QEMUGuest.tinyGuestCounterAddress, timeout: 1) } throws: {
            ($0 as? GeminusError)?.message.contains("is not running") == true
        }
        // Without the private socket: refused with the enrolment fix. (Redefined from libvirt's
        // own XML: it carries the uuid, and libvirt refuses a same-named domain without it.)
        let full = try conn.xml(of: domain, .persistent)
        let without = full.replacingOccurrences(of: "<qemu:arg value='-qmp'/>", with: "")
            .replacingOccurrences(of: "<qemu:arg value='unix:\(PrivateQMP.socketPath(domain: name)),server=on,wait=off'/>", with: "")
        #expect(without != full)
        #expect(CAEnrollmentCheck(xml: without).problems.map(\.code) == [.privateQMP])
        _ = try conn.defineDomain(xml: without)
        let persistent = try conn.xml(of: domain, .persistent)
        #expect(CAEnrollmentCheck(xml: persistent).problems.map(\.code) == [.privateQMP])
        try conn.start(domain)
        #expect { try LibvirtGuest.attach(connection: conn, domainName: name, counterAddress: QEMUGuest.tinyGuestCounterAddress, timeout: 0.5) } throws: {
            ($0 as? GeminusError)?.fix?.contains("geminus enroll \(name) --peer HOST --prepare") == true
        }
        // prepare() puts it back; libvirt accepts the result and the check passes on its XML.
        try conn.destroy(domain)
        let prepared = try CAEnrollmentCheck.prepare(persistent)
        _ = try conn.defineDomain(xml: prepared)
        #expect(CAEnrollmentCheck(xml: try conn.xml(of: domain, .persistent)).problems == [])
        try conn.start(domain)
        let guest = try LibvirtGuest.attach(connection: conn, domainName: name, counterAddress: QEMUGuest.tinyGuestCounterAddress)
        guest.shutdown()
    }

    /// Primary domain A, standby from definition B (same XML, another name, serial file and
    /// no uuid: on one machine they cannot share a name). Captures go into B's RAM file as the
    /// replica would apply them; A is SIGKILLed at a random moment; B resumes from the last
    /// committed device state.
    @Test func replicateKillAndResumeOnLibvirtStandby() throws {
        guard let conn = LibvirtEnv.connect(), let kernel = Self.kernel() else { return }
        let nameA = LibvirtEnv.uniqueName("pa")
        let nameB = LibvirtEnv.uniqueName("sb")
        defer {
            LibvirtEnv.cleanUp(conn, nameA)
            LibvirtEnv.cleanUp(conn, nameB)
            try? conn.close()
        }
        let domainA = try conn.defineDomain(xml: LibvirtEnv.domainXML(name: nameA, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(nameA).serial", pages: 64))
        let domainB = try conn.defineDomain(xml: LibvirtEnv.domainXML(name: nameB, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(nameB).serial", pages: 64))
        let definitionB = try conn.xml(of: domainB, .persistent)
        try conn.start(domainA)
        let primary = try LibvirtGuest.attach(connection: conn, domainName: nameA, counterAddress: QEMUGuest.tinyGuestCounterAddress)
        defer { primary.shutdown() }

        let standby = LibvirtStandby(connection: conn, domainName: nameB, counterAddress: QEMUGuest.tinyGuestCounterAddress)
        defer { standby.cleanup() }
        #expect(standby.expectedPageCount == primary.pageCount)
        #expect(!standby.isStandbyReady)
        let replica = try standby.makeReplicaMemory(pageCount: primary.pageCount)
        #expect(standby.isStandbyReady)
        #expect(standby.standbyPID != nil)
        #expect(try conn.state(of: domainB).state == .paused)
        #expect(try conn.xml(of: domainB, .persistent) == definitionB, "the persistent definition stays unchanged")
        #expect(try conn.xml(of: domainB, .live).contains("migration.send-configuration=off"))
        try Self.waitBooted(primary.memory)

        // Kill A at a random moment from another thread while delta checkpoints run (the clock
        // starts after the full one, which on a busy machine can take longer than the window).
        let killAfterMs = Int.random(in: 150...600)
        let killer = Thread { Self.sleep(ms: killAfterMs); primary.crash() }
        let buffer = CheckpointBuffer(limitPages: primary.pageCount)
        var deviceState: [UInt8] = []
        var committedCounter: UInt64 = 0
        var timings: [CaptureTimings] = []
        var epoch = 0
        var bootMarker: UInt64 = 0
        while true {
            Self.sleep(ms: 20)
            do {
                try primary.pause()
                try primary.capture(full: epoch == 0, into: buffer)
                let counter = primary.progressCounter
                try primary.resume()
                // Commit: the replica applies the epoch's pages, then the device state becomes
                // the one to resume from (an epoch cut short by the crash is discarded).
                for i in 0..<buffer.pageCount {
                    replica.page(buffer.pageIndices[i]).copyMemory(from: buffer.contents(at: i), byteCount: GuestPage.size)
                }
                deviceState = buffer.deviceState
                committedCounter = counter
                bootMarker = replica.loadU64(at: Self.bootMarkerAddress)
                if epoch > 0, let t = primary.lastTimings { timings.append(t) }
                epoch += 1
                if epoch == 1 { killer.start() }
            } catch {
                break  // the primary is gone
            }
            if epoch > 200 { Issue.record("the primary was not killed"); return }
        }
        try #require(epoch >= 2, "at least a full and a delta checkpoint before the crash (killed after \(killAfterMs) ms)")
        Self.report("primary before kill at \(killAfterMs) ms", timings)
        #expect(replica.loadU64(at: 0x200008) == committedCounter)

        let resumed = try standby.resumeGuest(memory: replica, deviceState: deviceState)
        defer { resumed.shutdown() }
        #expect(!standby.isStandbyReady)
        let first = resumed.progressCounter
        #expect(first >= committedCounter)
        #expect(first < committedCounter + 5_000_000, "continues from the checkpoint")
        Self.sleep(ms: 300)
        let later = resumed.progressCounter
        #expect(later > first, "the resumed guest runs")
        #expect(resumed.memory.loadU64(at: Self.bootMarkerAddress) == bootMarker, "same boot: resumed, not rebooted")
        #expect(try Self.libvirtReaches(.running, conn, domainB, "standby after resume"), "libvirt reports the resumed standby running")
        #expect(try conn.xml(of: domainB, .persistent) == definitionB)

        // The resumed guest is protected in turn.
        try resumed.pause()
        try resumed.capture(full: true, into: buffer)
        try resumed.resume()
        Self.sleep(ms: 20)
        try resumed.pause()
        try resumed.capture(full: false, into: buffer)
        try resumed.resume()
        #expect(buffer.pageCount > 0 && !buffer.deviceState.isEmpty)
        #expect(resumed.progressCounter > later)

        let r = try #require(standby.lastResumeTimings)
        FileHandle.standardError.write(Data("""
            libvirt-standby resume: \(String(format: "%.2f", Double(r.totalNanos) / 1e6)) ms \
            (pipe \(String(format: "%.2f", Double(r.writeStateNanos) / 1e6)), load \(String(format: "%.2f", Double(r.loadNanos) / 1e6)) \
            [migrate-incoming \(String(format: "%.2f", Double(r.incomingCommandNanos) / 1e6)), \(r.polls) polls], \
            cont \(String(format: "%.2f", Double(r.contNanos) / 1e6)) ms, \(r.contRetries) retries; announce-self \
            \(String(format: "%.2f", Double(r.announceNanos) / 1e6)) ms); \(epoch) checkpoints, counter at checkpoint \(committedCounter), \
            after resume \(first), 300 ms later \(later)\n
            """.utf8))
        resumed.shutdown()
        #expect(try conn.state(of: domainB).state == .shutOff)
        standby.cleanup()
        #expect(try conn.xml(of: domainB, .persistent) == definitionB)
    }

    @Test func standbyCleanupDestroysTheWaitingDomainOnly() throws {
        guard let conn = LibvirtEnv.connect(), let kernel = Self.kernel() else { return }
        let name = LibvirtEnv.uniqueName("sc")
        defer {
            LibvirtEnv.cleanUp(conn, name)
            try? conn.close()
        }
        let domain = try conn.defineDomain(xml: LibvirtEnv.domainXML(name: name, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(name).serial"))
        let standby = LibvirtStandby(connection: conn, domainName: name, counterAddress: QEMUGuest.tinyGuestCounterAddress)
        #expect(throws: GeminusError.self) { try standby.makeReplicaMemory(pageCount: 1234) }
        _ = try standby.makeReplicaMemory(pageCount: 32 << 8)
        #expect(standby.isStandbyReady)
        standby.cleanup()
        standby.cleanup()
        #expect(!standby.isStandbyReady)
        #expect(try conn.state(of: domain).state == .shutOff)
        #expect(try conn.isPersistent(domain))
    }

    /// The standby compares what libvirt made of each host's definition: `pc` is expanded at
    /// define time, so an identical definition matches and a q35 one is refused by name.
    @Test func platformComparesTheExpandedMachineType() throws {
        guard let conn = LibvirtEnv.connect(), let kernel = Self.kernel() else { return }
        let (a, b, c) = (LibvirtEnv.uniqueName("pa"), LibvirtEnv.uniqueName("pb"), LibvirtEnv.uniqueName("pc"))
        defer {
            for n in [a, b, c] { LibvirtEnv.cleanUp(conn, n) }
            try? conn.close()
        }
        for n in [a, b] {
            _ = try conn.defineDomain(xml: LibvirtEnv.domainXML(name: n, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(n).serial"))
        }
        let q35 = LibvirtEnv.domainXML(name: c, kernel: kernel, serialPath: LibvirtEnv.workDirectory + "/\(c).serial")
            .replacingOccurrences(of: "machine='pc'", with: "machine='q35'")
        _ = try conn.defineDomain(xml: q35)
        func platform(_ n: String) throws -> GuestPlatform {
            LibvirtPlatform.of(xml: try conn.xml(of: try conn.lookupDomain(named: n), .persistent), connection: conn)
        }
        let primary = try platform(a)
        let machine = try #require(primary.facts.first { $0.name == "machine type" }?.value)
        #expect(machine.hasPrefix("pc-i440fx-"), "libvirt did not expand 'pc': \(machine)")
        #expect(primary.facts.contains { $0.name == "QEMU version" && !$0.value.isEmpty })
        #expect(LibvirtStandby(connection: conn, domainName: b, counterAddress: QEMUGuest.tinyGuestCounterAddress).platform.differences(fromPrimary: primary) == [])
        let refused = LibvirtStandby(connection: conn, domainName: c, counterAddress: QEMUGuest.tinyGuestCounterAddress).platform.differences(fromPrimary: primary)
        #expect(refused.count == 1 && refused.first?.hasPrefix("machine type: \(machine) on the primary, pc-q35-") == true, "\(refused)")
    }
}
