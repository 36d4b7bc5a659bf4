import Foundation
import Testing
import GeminusCore
@testable import GeminusLibvirt

/// The bounded-call machinery, without a daemon.
@Suite struct LibvirtCallTests {
    @Test func hungCallTimesOutNamingTheCall() {
        let flagged = Flag()
        let start = ContinuousClock.now
        do {
            _ = try LibvirtCall.run("virDomainSuspend for 'x' on qemu:///system", timeout: 0.1, onTimeout: { flagged.set() }) {
                Thread.sleep(forTimeInterval: 2)
                return 1
            }
            Issue.record("no timeout")
        } catch let e as GeminusError {
            #expect(e.code == .timeout)
            #expect(e.message.contains("virDomainSuspend for 'x' on qemu:///system"))
            #expect(e.message.contains("100 ms"))
            #expect(e.message.contains("unknown"))
        } catch {
            Issue.record("unexpected \(error)")
        }
        #expect(flagged.isSet)
        #expect(ContinuousClock.now - start < .seconds(1.5))
    }

    @Test func lateResultIsReleased() throws {
        let released = Flag()
        #expect(throws: GeminusError.self) {
            try LibvirtCall.run("x", timeout: 0.05, onTimeout: {}, release: { (_: Int) in released.set() }) {
                Thread.sleep(forTimeInterval: 0.3)
                return 7
            }
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while !released.isSet && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.02) }
        #expect(released.isSet)
    }

    @Test func resultsAndErrorsComeBack() throws {
        #expect(try LibvirtCall.run("x", timeout: 5, onTimeout: {}) { 42 } == 42)
        #expect(throws: GeminusError(.hypervisor, "boom")) {
            try LibvirtCall.run("x", timeout: 5, onTimeout: {}) { () -> Int in throw GeminusError(.hypervisor, "boom") }
        }
    }

    @Test func stateNamesKeepUnknownApart() {
        #expect(LibvirtDomainState(raw: 5) == .shutOff)
        #expect(LibvirtDomainState(raw: 1) == .running)
        #expect(LibvirtDomainState(raw: 0) == .unknown(raw: 0))
        #expect(LibvirtDomainState(raw: 99) == .unknown(raw: 99))
        #expect(LibvirtDomainState.unknown(raw: 0).hasProcess == nil)
        #expect(LibvirtDomainState.shutOff.hasProcess == false)
        #expect(LibvirtDomainState.paused.hasProcess == true)
    }

    @Test func qmpCommandNameForMessages() {
        #expect(LibvirtConnection.commandName(#"{"execute":"query-status"}"#) == "query-status")
        #expect(LibvirtConnection.commandName("nonsense") == "QMP")
    }
}

final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

@Suite struct LibvirtOpenFailureTests {
    /// No daemon needed: a socket that does not exist fails at once with libvirt's message and
    /// the commands that start libvirtd.
    @Test func unreachableDaemonSaysHowToStartIt() {
        do {
            _ = try LibvirtConnection.open(uri: "qemu+unix:///system?socket=/nonexistent/geminus-test.sock", timeout: 10)
            Issue.record("connected to a socket that does not exist")
        } catch let e as GeminusError {
            #expect(e.code == .hypervisor)
            #expect(e.message.contains("cannot connect to libvirt"))
            #expect(e.message.contains("/nonexistent/geminus-test.sock"))
            #expect(e.fix?.contains("libvirtd -d") == true)
            #expect(e.fix?.contains("libvirt-daemon-system") == true)
        } catch {
            Issue.record("unexpected \(error)")
        }
    }
}
