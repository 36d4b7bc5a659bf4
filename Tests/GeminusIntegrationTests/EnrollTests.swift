import Foundation
import GeminusLibvirt
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
          <devices><serial type='file'><source path='\(serial)'/><target port='0'/></serial></devices>
        </domain>
        """
    }

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
        #expect(try conn.readEnrollment(of: dom) == nil)

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
        // Tools/test builds the write-tracking library beside the binary: --prepare puts it in
        // QEMU's environment, and the JSON says so.
        let library = TinyGuest.repoRoot.appendingPathComponent(".build/geminus-uffd-preload/libgeminus-uffd-preload.so").path
        #expect(CAEnrollmentCheck.qemuEnvironment("LD_PRELOAD", inDomainXML: try conn.xml(of: dom, .persistent)) == library)
        #expect(j["writeTrackingPreload"] as? String == library, "\(j)")

        #expect(try GeminusBinary.run(["unenroll", name]).status == 0)
        #expect(try conn.readEnrollment(of: dom) == nil)
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
