import Foundation
import GeminusLibvirt
import GeminusQEMU
import Testing

/// `geminus enroll` against a real libvirtd, on a throwaway domain defined for the test.
@Suite(.serialized, .disabled(if: TinyGuest.skipRequested, "GEMINUS_SKIP_VM_TESTS=1"))
struct EnrollTests {
    /// A domain as an operator might have it: private RAM, libvirt's default balloon.
    func plainDomainXML(name: String, kernel: String, serial: String) -> String {
        """
        <domain type='qemu'>
          <name>\(name)</name>
          <memory unit='MiB'>32</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type><kernel>\(kernel)</kernel></os>
          <devices><serial type='file'><source path='\(serial)'/><target port='0'/></serial>\(interfaces)</devices>
        </domain>
        """
    }

    /// Two interfaces an operator might have: virtio on a bridge and e1000 on a libvirt network.
    let interfaces = """
        <interface type='bridge'><mac address='52:54:00:e0:00:01'/><source bridge='br-enroll-test'/><model type='virtio'/><driver name='vhost'/></interface>\
        <interface type='network'><mac address='52:54:00:e0:00:02'/><source network='default'/><model type='e1000'/></interface>
        """

    @Test func enrollRefusesExplainsPreparesAndRecords() throws {
        guard let kernel = try TinyGuest.kernel() else { return }
        let conn: LibvirtConnection
        do {
            conn = try LibvirtConnection.open()
        } catch {
            Issue.record("no libvirt daemon: \(error). As root, Tools/start-libvirt starts one; or set GEMINUS_SKIP_VM_TESTS=1")
            return
        }
        defer { try? conn.close() }
        let name = "geminus-test-enroll-\(UInt32.random(in: 0...UInt32.max))"
        let dom = try conn.defineDomain(xml: plainDomainXML(name: name, kernel: kernel, serial: "/tmp/\(name).serial"))
        defer { try? conn.undefine(dom) }

        let refused = try GeminusBinary.run(["enroll", name, "--peer", "10.0.0.2"])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("cannot be protected in CA mode"), "\(refused.stderr)")
        #expect(refused.stderr.contains("fix:"))
        #expect(refused.stderr.lowercased().contains("balloon"))
        #expect(refused.stderr.contains("--prepare"))
        #expect(refused.stderr.contains("52:54:00:e0:00:01 on bridge br-enroll-test sends its frames straight to the network, unheld"), "\(refused.stderr)")
        #expect(try conn.readEnrollment(of: dom) == nil)
        let originalXML = try conn.xml(of: dom, .persistent)

        let unconfirmed = try GeminusBinary.run(["enroll", name, "--peer", "10.0.0.2", "--prepare"])
        #expect(unconfirmed.status == 1)
        #expect(unconfirmed.stderr.contains("not confirmed"))
        #expect(!CAEnrollmentCheck(xml: try conn.xml(of: dom, .persistent)).canProtect)

        let prepared = try GeminusBinary.run(["enroll", name, "--peer", "10.0.0.2:7401", "--interval-millis", "40", "--prepare", "--yes", "--json"])
        #expect(prepared.status == 0, "\(prepared.stderr)")
        let j = try #require(try JSONSerialization.jsonObject(with: Data(prepared.stdout.utf8)) as? [String: Any])
        #expect(j["enrolled"] as? Bool == true)
        #expect(CAEnrollmentCheck(xml: try conn.xml(of: dom, .persistent)).canProtect)
        let recorded = try #require(try conn.readEnrollment(of: dom))
        #expect(recorded.peer == "10.0.0.2:7401")
        #expect(recorded.intervalMilliseconds == 40)
        // Tools/test installs the write-tracking library in /usr/local/lib/geminus (the only
        // places it is trusted from): --prepare puts it in QEMU's environment, and the JSON says so.
        let library = WriteTrackingPreload.installDirectory + "/" + WriteTrackingPreload.fileName
        #expect(CAEnrollmentCheck.qemuEnvironment("LD_PRELOAD", inDomainXML: try conn.xml(of: dom, .persistent)) == library)
        #expect(j["writeTrackingPreload"] as? String == library, "\(j)")
        // libvirt took both interfaces moved to the agent's loopback socket, model and MAC kept,
        // and the record says where each was attached.
        let preparedXML = try conn.xml(of: dom, .persistent)
        #expect(prepared.stderr.contains("interface 52:54:00:e0:00:01 (virtio) on bridge br-enroll-test: QEMU listens on 127.0.0.1:"), "\(prepared.stderr)")
        let record = try #require(try HeldInterfaces.find(inDomainXML: preparedXML))
        #expect(record.interfaces.map(\.attachment) == [.bridge("br-enroll-test"), .network("default")])
        #expect(try HeldInterfaces.endpoints(inDomainXML: preparedXML).map(\.port) == record.interfaces.map(\.port))
        #expect(preparedXML.contains("<model type='e1000'/>"), "\(preparedXML)")

        let unenrolled = try GeminusBinary.run(["unenroll", name])
        #expect(unenrolled.status == 0)
        #expect(unenrolled.stdout.contains("restored 2 network interface(s)"), "\(unenrolled.stdout)")
        #expect(try conn.readEnrollment(of: dom) == nil)
        // The interfaces are back as they were (libvirt's own rendering of them).
        let restoredXML = try conn.xml(of: dom, .persistent)
        let nics = { (xml: String) in xml.components(separatedBy: "<interface").dropFirst().map { $0.components(separatedBy: "</interface>")[0] } }
        #expect(nics(restoredXML) == nics(originalXML), "\(restoredXML)")
        #expect(try HeldInterfaces.find(inDomainXML: restoredXML) == nil)
        let again = try GeminusBinary.run(["unenroll", name])
        #expect(again.status == 1)
        #expect(again.stderr.contains("not enrolled"))
    }

    @Test func unknownDomainIsNamed() throws {
        let r = try GeminusBinary.run(["enroll", "geminus-test-no-such-domain", "--peer", "10.0.0.2"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("no domain named 'geminus-test-no-such-domain'"), "\(r.stderr)")
    }
}
