import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Testing
import GeminusCore
@testable import GeminusLibvirt

/// What `enroll --prepare` does to a domain's interfaces and what `unenroll` undoes: pure XML, no
/// libvirt needed.
@Suite struct HeldInterfaceTests {
    static let threeNICs = """
    <domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
      <name>shop-1</name>
      <memory unit='MiB'>512</memory>
      <vcpu>1</vcpu>
      <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
      <devices>
        <interface type='bridge'>
          <mac address='52:54:00:0A:00:01'/>
          <source bridge='br-front'/>
          <target dev='vnet7'/>
          <virtualport type='openvswitch'/>
          <filterref filter='clean-traffic'/>
          <bandwidth><inbound average='1000'/></bandwidth>
          <model type='virtio'/>
          <driver name='vhost' queues='4' rx_queue_size='256'/>
          <boot order='2'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
        </interface>
        <interface type='network'>
          <mac address='52:54:00:0a:00:02'/>
          <source network='default' portgroup='web'/>
          <model type='e1000'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
        </interface>
        <interface type='bridge'>
          <mac address='52:54:00:0a:00:03'/>
          <source bridge='br-back'/>
          <model type='ne2k_isa'/>
          <address type='isa' iobase='0x300' irq='0x9'/>
        </interface>
        <memballoon model='none'/>
      </devices>
    </domain>
    """

    static func interfaces(_ xml: String) throws -> [XMLElement] {
        try CAEnrollmentCheck.parseDomain(xml).child("devices")?.children("interface") ?? []
    }

    static func canonical(_ e: XMLElement) -> String {
        e.xmlString(options: [.nodeCompactEmptyElement]).replacingOccurrences(of: "\\s+", with: "", options: .regularExpression).lowercased()
    }

    @Test func unpreparedInterfacesAreUnheld() {
        let c = CAEnrollmentCheck(xml: Self.threeNICs)
        let unheld = c.problems.filter { $0.code == .unheldInterface }
        #expect(unheld.count == 3)
        #expect(unheld[0].message.contains("52:54:00:0A:00:01 on bridge br-front"))
        #expect(unheld[1].message.contains("network default"))
        #expect(unheld.allSatisfy { $0.fix.contains("--prepare") })
    }

    @Test func prepareMovesEveryInterfaceToTheAgentAndRecordsIt() throws {
        let out = try CAEnrollmentCheck.prepare(Self.threeNICs)
        #expect(!CAEnrollmentCheck(xml: out).problems.contains { $0.code == .unheldInterface })
        let nics = try Self.interfaces(out)
        #expect(nics.count == 3)
        var ports: Set<Int> = []
        for (n, i) in nics.enumerated() {
            #expect(i.attr("type") == "server")
            #expect(i.child("source")?.attr("address") == "127.0.0.1")
            let port = try #require(i.child("source")?.attr("port").flatMap { Int($0) })
            #expect(port == HeldInterfaces.defaultPort(domain: "shop-1", index: n, avoiding: ports))
            ports.insert(port)
            for gone in ["target", "virtualport", "filterref", "bandwidth"] { #expect(i.child(gone) == nil, "kept <\(gone)>") }
        }
        #expect(ports.count == 3)
        // The guest's side is kept: MAC, model, slot, boot order, driver options other than vhost.
        #expect(nics[0].child("mac")?.attr("address") == "52:54:00:0A:00:01")
        #expect(nics[0].child("model")?.attr("type") == "virtio")
        #expect(nics[0].child("address")?.attr("slot") == "0x03")
        #expect(nics[0].child("boot")?.attr("order") == "2")
        #expect(nics[0].child("driver")?.attr("name") == nil)
        #expect(nics[0].child("driver")?.attr("queues") == nil)
        #expect(nics[0].child("driver")?.attr("rx_queue_size") == "256")
        #expect(nics[1].child("model")?.attr("type") == "e1000")
        #expect(nics[1].child("address")?.attr("slot") == "0x04")
        #expect(nics[2].child("model")?.attr("type") == "ne2k_isa")
        #expect(nics[2].child("address")?.attr("iobase") == "0x300")

        let record = try #require(try HeldInterfaces.find(inDomainXML: out))
        #expect(record.interfaces.map(\.mac) == ["52:54:00:0a:00:01", "52:54:00:0a:00:02", "52:54:00:0a:00:03"])
        #expect(record.interfaces.map(\.attachment) == [.bridge("br-front"), .network("default"), .bridge("br-back")])
        #expect(record.interfaces.map(\.model) == ["virtio", "e1000", "ne2k_isa"])
        #expect(Set(record.interfaces.map(\.port)) == ports)
        // The agent finds each interface's port in the (live) XML by its MAC.
        #expect(try HeldInterfaces.endpoints(inDomainXML: out).map(\.port) == record.interfaces.map(\.port))

        // Idempotent: a second --prepare changes nothing.
        #expect(try CAEnrollmentCheck.prepare(out) == out)
    }

    @Test func preparePortsSkipThoseInUse() throws {
        let first = HeldInterfaces.defaultPort(domain: "shop-1", index: 0)
        let out = try CAEnrollmentCheck.prepare(Self.threeNICs, avoidingPorts: [first, first + 1])
        let ports = try #require(try HeldInterfaces.find(inDomainXML: out)).interfaces.map(\.port)
        #expect(!ports.contains(first) && !ports.contains(first + 1))
        #expect(Set(ports).count == 3)
    }

    @Test func unenrollRestoresTheOriginalInterfaces() throws {
        let prepared = try CAEnrollmentCheck.prepare(Self.threeNICs)
        let back = try CAEnrollmentCheck.restoringInterfaces(prepared)
        #expect(back.restored == 3)
        #expect(back.missing == [])
        #expect(try HeldInterfaces.find(inDomainXML: back.xml) == nil)
        #expect(!back.xml.contains("<metadata"))
        let before = try Self.interfaces(Self.threeNICs).map(Self.canonical)
        let after = try Self.interfaces(back.xml).map(Self.canonical)
        #expect(after == before)
        // Not enrolled any more: the interfaces send unheld again, and the check says so.
        #expect(CAEnrollmentCheck(xml: back.xml).problems.filter { $0.code == .unheldInterface }.count == 3)
        // Nothing recorded: unchanged.
        #expect(try CAEnrollmentCheck.restoringInterfaces(Self.threeNICs).xml == Self.threeNICs)
    }

    @Test func unenrollReportsARecordedInterfaceThatIsGone() throws {
        let prepared = try CAEnrollmentCheck.prepare(Self.threeNICs)
        let root = try CAEnrollmentCheck.parseDomain(prepared)
        let devices = try #require(root.child("devices"))
        devices.removeChild(at: devices.children("interface")[1].index)
        let back = try CAEnrollmentCheck.restoringInterfaces(root.xmlString)
        #expect(back.restored == 2)
        #expect(back.missing == ["52:54:00:0a:00:02"])
    }

    @Test func whatCannotBeHeldIsRefusedWithReasonAndFix() throws {
        let cases: [(String, CAEnrollmentCheck.Code)] = [
            ("<interface type='vhostuser'><mac address='52:54:00:aa:00:01'/><source type='unix' path='/tmp/vu.sock' mode='server'/><model type='virtio'/></interface>", .vhostUser),
            ("<interface type='hostdev' managed='yes'><mac address='52:54:00:aa:00:02'/><source><address type='pci' domain='0x0000' bus='0x04' slot='0x10' function='0x1'/></source></interface>", .hostdev),
            ("<interface type='vdpa'><mac address='52:54:00:aa:00:03'/><source dev='/dev/vhost-vdpa-0'/></interface>", .vdpa),
            ("<interface type='direct'><mac address='52:54:00:aa:00:04'/><source dev='eth0' mode='passthrough'/><model type='virtio'/></interface>", .directInterface),
            ("<interface type='user'><mac address='52:54:00:aa:00:05'/><model type='virtio'/></interface>", .unheldInterface),
            ("<interface type='ethernet'><mac address='52:54:00:aa:00:06'/><target dev='tap9'/></interface>", .unheldInterface),
            // A socket interface enrolment did not make: where would its frames be released?
            ("<interface type='server'><mac address='52:54:00:aa:00:07'/><source address='127.0.0.1' port='5555'/></interface>", .unheldInterface),
        ]
        for (nic, code) in cases {
            let xml = Self.threeNICs.replacingOccurrences(of: "<memballoon model='none'/>", with: nic + "<memballoon model='none'/>")
            let prepared = try CAEnrollmentCheck.prepare(xml)
            let problems = CAEnrollmentCheck(xml: prepared).problems.filter { $0.code == code }
            #expect(problems.count == 1, "\(code): \(CAEnrollmentCheck(xml: prepared).problems)")
            guard let p = problems.first else { continue }
            #expect(p.message.contains("52:54:00:aa:00:0"))
            #expect(p.message.contains("cannot be held") || p.message.contains("not one the agent can hold"), "\(p.message)")
            #expect(p.fix.contains("'bridge'"), "\(p.fix)")
            // Left as it was by --prepare.
            #expect(try Self.interfaces(prepared).filter { $0.attr("type") == "server" }.count == (code == .unheldInterface && nic.contains("'server'") ? 4 : 3))
        }
        // The direct interface's message names its device and the mode problem.
        let direct = CAEnrollmentCheck(xml: Self.threeNICs.replacingOccurrences(of: "<memballoon", with: cases[3].0 + "<memballoon"))
        #expect(direct.problems.contains { $0.code == .directInterface && $0.message.contains("eth0") && $0.fix.contains("Linux bridge") })
    }

    @Test func recordRoundTripsThroughMetadata() throws {
        let record = HeldInterfaces([
            HeldInterface(mac: "52:54:00:AA:BB:01", model: "virtio", attachment: .bridge("br0"), port: 47001,
                          original: "<interface type=\"bridge\"><source bridge=\"br0\"/><!-- & 'quotes' < > --></interface>"),
            HeldInterface(mac: "52:54:00:aa:bb:02", model: nil, attachment: .network("default"), port: 47002, original: "<interface type='network'/>"),
        ])
        let text = record.qualifiedElement.xmlString(options: [.nodeCompactEmptyElement])
        #expect(text.contains("xmlns:geminus-nic=\"https://geminus.dev/xmlns/ca-interfaces/1\""))
        let parsed = try HeldInterfaces(root: try #require(try parseXMLStrictly(text).rootElement()))
        #expect(parsed == record)
        #expect(parsed.interface(mac: "52:54:00:aa:bb:01")?.port == 47001)
        // Inside a domain's <metadata>, as libvirt writes it (with the prefix).
        let domain = "<domain type='qemu'><name>a</name><metadata>\(text)</metadata></domain>"
        #expect(try HeldInterfaces.find(inDomainXML: domain) == record)
        #expect(try HeldInterfaces.find(inDomainXML: "<domain type='qemu'><name>a</name></domain>") == nil)
    }

    @Test func unusableRecordsSayHowToRecover() {
        for bad in [#"<interfaces version="2"/>"#,
                    #"<interfaces version="1"><interface network="n" port="1" original="x"/></interfaces>"#,
                    #"<interfaces version="1"><interface mac="52:54:00:00:00:01" port="1" original="x"/></interfaces>"#,
                    #"<interfaces version="1"><interface mac="52:54:00:00:00:01" bridge="b" port="0" original="x"/></interfaces>"#,
                    #"<interfaces version="1"><interface mac="52:54:00:00:00:01" bridge="b" port="9"/></interfaces>"#] {
            do {
                _ = try HeldInterfaces(root: try parseXMLStrictly(bad).rootElement()!)
                Issue.record("accepted \(bad)")
            } catch let e as GeminusError {
                #expect(e.fix?.contains("--remove --config") == true)
            } catch {
                Issue.record("unexpected error \(error)")
            }
        }
    }

    @Test func standbyRebindsPortsAndFramesAreTaggedOnlyWithSeveralNICs() throws {
        let prepared = try CAEnrollmentCheck.prepare(Self.threeNICs)
        var next = 60000
        let standby = try HeldInterfaces.rebindingPorts(inDomainXML: prepared) { _ in next += 1; return next }
        #expect(try HeldInterfaces.endpoints(inDomainXML: standby).map(\.port) == [60001, 60002, 60003])
        // The record (what unenroll restores, where frames are released) is unchanged.
        #expect(try HeldInterfaces.find(inDomainXML: standby) == HeldInterfaces.find(inDomainXML: prepared))
        #expect(NICTag.tag(index: 0, of: 1) == nil)
        #expect(NICTag.tag(index: 2, of: 3) == 2)
    }

    @Test func interfaceWithoutMACGetsAStableOne() throws {
        let xml = "<domain type='qemu'><name>nomac</name><devices><interface type='bridge'><source bridge='br0'/></interface></devices></domain>"
        let a = try CAEnrollmentCheck.prepare(xml)
        #expect(try CAEnrollmentCheck.prepare(xml) == a)
        let mac = try #require(try Self.interfaces(a).first?.child("mac")?.attr("address"))
        #expect(mac.hasPrefix("52:54:00:"))
        #expect(try HeldInterfaces.find(inDomainXML: a)?.interfaces.first?.mac == mac)
    }
}
