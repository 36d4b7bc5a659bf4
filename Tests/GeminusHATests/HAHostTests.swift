import Foundation
import GeminusCluster
import GeminusCore
import GeminusHA
import GeminusHAHost
import Testing

/// The pieces of the HA agent around the node: its bounded inbox, the status file the other
/// commands read, the fence configuration, and the domain definition rewritten for a restart.
struct HAHostTests {
    static func scan(_ n: Int) -> HAInput { .scan(HostScan(vms: [], ramTotalMiB: n, ramCommittedMiB: 0)) }

    @Test func inboxSupersedesScansWhenFullAndReportsIt() {
        let inbox = HAInbox(limit: 3)
        inbox.push(Self.scan(1))
        inbox.push(.startDone(vm: "a", ok: true, detail: ""))
        inbox.push(Self.scan(2))
        inbox.push(.fenceDone(node: "n3", confirmed: true, detail: ""))  // full: the oldest scan gives way
        #expect(inbox.count == 3)
        var expected = HAInbox.Overflow()
        expected.scansSuperseded = 1
        #expect(inbox.pop() == .inboxOverflow(expected))
        #expect(inbox.pop() == .startDone(vm: "a", ok: true, detail: ""))
        #expect(inbox.pop() == Self.scan(2))
        #expect(inbox.pop() == .fenceDone(node: "n3", confirmed: true, detail: ""))
        #expect(inbox.pop() == nil)
    }

    @Test func aFullInboxWithoutScansMakesItsProducerWait() throws {
        let inbox = HAInbox(limit: 2)
        inbox.push(.startDone(vm: "a", ok: true, detail: ""))
        inbox.push(.startDone(vm: "b", ok: true, detail: ""))
        let done = DispatchSemaphore(value: 0)
        Thread { inbox.push(.startDone(vm: "c", ok: true, detail: "")); done.signal() }.start()
        #expect(done.wait(timeout: .now() + .milliseconds(100)) == .timedOut, "the producer waits for room, nothing is dropped")
        #expect(inbox.overflowSoFar.producerWaits == 1)
        var expected = HAInbox.Overflow()
        expected.producerWaits = 1
        #expect(inbox.pop() == .inboxOverflow(expected))
        #expect(inbox.pop() == .startDone(vm: "a", ok: true, detail: ""))
        #expect(done.wait(timeout: .now() + .seconds(5)) == .success)
        #expect(inbox.pop() == .startDone(vm: "b", ok: true, detail: ""))
        #expect(inbox.pop() == .startDone(vm: "c", ok: true, detail: ""))
    }

    @Test func statusFileIsOneFlatObject() throws {
        let status = HAStatus(node: "n1", nodeID: 1, quorate: true, quorumChangedAgoMillis: 5, coordinator: "n1",
                              members: [.init(name: "n1", id: 1, spare: false, ramTotalMiB: 100, ramFreeMiB: 50, vms: [VMReport(name: "a", ramMiB: 50)])],
                              fenced: [], recovery: [], inboxOverflow: HAInbox.Overflow())
        let file = HAStatusFile(host: .init(pid: 7, uri: "qemu:///system", domainPrefix: "n1-", updatedAtMillis: 9), status: status)
        let data = try file.encoded()
        let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(object["quorate"] as? Bool == true && object["pid"] as? Int == 7 && object["domainPrefix"] as? String == "n1-")
        let back = try JSONDecoder().decode(HAStatusFile.self, from: data)
        #expect(back.status == status && back.uri == "qemu:///system" && back.members.count == 1)
    }

    @Test func fenceConfiguration() throws {
        let c = try FenceAgents.parse("# comment\n\nn3 /usr/sbin/fence_ipmilan --ip=10.0.0.13 --action=off\n", path: "f")
        #expect(c == ["n3": ["/usr/sbin/fence_ipmilan", "--ip=10.0.0.13", "--action=off"]])
        #expect(throws: GeminusError.self) { try FenceAgents.parse("n3 fence_ipmilan\n", path: "f") }
        let (ok, detail) = FenceAgents(commands: [:], timeoutMillis: 100).run(node: "n3")
        #expect(!ok && detail.contains("no fence agent configured for n3"))
    }

    @Test func retargetRenamesAndReplacesTheUUID() throws {
        let xml = "<domain type='kvm'><name>web1</name><uuid>1111</uuid><memory>1024</memory></domain>"
        let same = try HAHostEnvironment.retarget(xml, name: "n2-web1", uuid: nil)
        #expect(same.contains("<name>n2-web1</name>") && same.contains("<uuid>1111</uuid>"))
        let dropped = try HAHostEnvironment.retarget(xml, name: "n2-web1", uuid: "")
        #expect(!dropped.contains("uuid"))
        let set = try HAHostEnvironment.retarget(xml, name: "n2-web1", uuid: "2222")
        #expect(set.contains("<uuid>2222</uuid>") && !set.contains("1111"))
    }
}
