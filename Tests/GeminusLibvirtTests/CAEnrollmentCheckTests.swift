import Foundation
import Testing
import GeminusCore
@testable import GeminusLibvirt

/// Pure checks over hand-written domain XML: no libvirt needed.
@Suite struct CAEnrollmentCheckTests {
    static let good = """
    <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
      <name>billing-1</name>
      <uuid>5cc0dfb5-f59f-417d-811d-80c8c2325211</uuid>
      <metadata>
        <geminus-nic:interfaces xmlns:geminus-nic='https://geminus.dev/xmlns/ca-interfaces/1' version='1'><geminus-nic:interface mac='52:54:00:12:34:56' model='virtio' network='default' port='47001' original='&lt;interface type="network"&gt;&lt;mac address="52:54:00:12:34:56"/&gt;&lt;source network="default"/&gt;&lt;model type="virtio"/&gt;&lt;/interface&gt;'/></geminus-nic:interfaces>
      </metadata>
      <memory unit='GiB'>4</memory>
      <currentMemory unit='GiB'>4</currentMemory>
      <memoryBacking>
        <source type='file'/>
        <access mode='shared'/>
      </memoryBacking>
      <vcpu placement='static'>2</vcpu>
      <os>
        <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
        <boot dev='hd'/>
      </os>
      <devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <disk type='file' device='disk'>
          <driver name='qemu' type='qcow2'/>
          <source file='/var/lib/libvirt/images/billing-1.qcow2'/>
          <target dev='vda' bus='virtio'/>
          <readonly/>
        </disk>
        <interface type='server'>
          <mac address='52:54:00:12:34:56'/>
          <source address='127.0.0.1' port='47001'/>
          <model type='virtio'/>
        </interface>
        <serial type='pty'><target port='0'/></serial>
        <memballoon model='none'/>
      </devices>
      <qemu:commandline>
        <qemu:arg value='-qmp'/>
        <qemu:arg value='unix:/run/geminus/qmp/billing-1.sock,server=on,wait=off'/>
      </qemu:commandline>
    </domain>
    """

    /// `good` with `old` replaced by `new` (the replacement must happen).
    static func variant(_ old: String, _ new: String) -> String {
        precondition(good.contains(old), "test XML does not contain \(old)")
        return good.replacingOccurrences(of: old, with: new)
    }

    static func codes(_ xml: String) -> [CAEnrollmentCheck.Code] {
        CAEnrollmentCheck(xml: xml).problems.map(\.code)
    }

    @Test func goodDomainPassesAndReportsFacts() {
        let c = CAEnrollmentCheck(xml: Self.good)
        #expect(c.problems == [])
        #expect(c.canProtect)
        #expect(c.error == nil)
        #expect(c.facts == CAEnrollmentCheck.Facts(
            name: "billing-1", uuid: "5cc0dfb5-f59f-417d-811d-80c8c2325211", domainType: "kvm", arch: "x86_64",
            machineType: "pc-q35-7.2", emulator: "/usr/bin/qemu-system-x86_64", memoryKiB: 4 << 20, vcpus: 2, hugepages: false))
    }

    @Test func tcgDomainIsAllowed() {
        #expect(Self.codes(Self.variant("type='kvm'", "type='qemu'")) == [])
    }

    @Test func otherDomainTypeIsRefused() {
        let c = CAEnrollmentCheck(xml: Self.variant("type='kvm'", "type='xen'"))
        #expect(c.problems.map(\.code) == [.domainType])
        #expect(c.problems[0].message.contains("'xen'"))
        #expect(c.problems[0].fix.contains("<domain type='kvm'>"))
    }

    @Test func anonymousMemoryNeedsFileSource() {
        let xml = Self.variant("""
            <memoryBacking>
                <source type='file'/>
                <access mode='shared'/>
              </memoryBacking>
            """, "")
        let c = CAEnrollmentCheck(xml: xml)
        #expect(c.problems.map(\.code) == [.memorySource, .memoryAccess])
        #expect(c.problems[0].fix.contains("<source type='file'/>"))
        #expect(c.problems[0].fix.contains("memory_backing_dir"))
        #expect(c.problems[1].fix.contains("<access mode='shared'/>"))
    }

    @Test func memfdSourceIsNamed() {
        let c = CAEnrollmentCheck(xml: Self.variant("<source type='file'/>", "<source type='memfd'/>"))
        #expect(c.problems.map(\.code) == [.memorySource])
        #expect(c.problems[0].message.contains("'memfd'"))
    }

    @Test func privateAccessIsRefused() {
        let c = CAEnrollmentCheck(xml: Self.variant("<access mode='shared'/>", "<access mode='private'/>"))
        #expect(c.problems.map(\.code) == [.memoryAccess])
        #expect(c.problems[0].message.contains("'private'"))
        #expect(c.problems[0].fix == "put <access mode='shared'/> in <memoryBacking>")
    }

    @Test func numaCellsCanCarryTheAccessMode() {
        let noAccess = Self.variant("<access mode='shared'/>", "")
        let shared = noAccess.replacingOccurrences(of: "<os>", with: """
            <cpu><numa><cell id='0' cpus='0' memory='2' unit='GiB' memAccess='shared'/><cell id='1' cpus='1' memory='2' unit='GiB' memAccess='shared'/></numa></cpu>
            <os>
            """)
        #expect(Self.codes(shared) == [])
        let onePrivate = Self.good.replacingOccurrences(of: "<os>", with: """
            <cpu><numa><cell id='0' cpus='0' memory='2' unit='GiB'/><cell id='1' cpus='1' memory='2' unit='GiB' memAccess='private'/></numa></cpu>
            <os>
            """)
        let c = CAEnrollmentCheck(xml: onePrivate)
        #expect(c.problems.map(\.code) == [.memoryAccess])
        #expect(c.problems[0].message.contains("NUMA cell 1"))
        #expect(c.problems[0].fix.contains("memAccess='shared'"))
    }

    @Test func hugepagesAreAllowed() {
        let noSource = Self.variant("<source type='file'/>", "<hugepages><page size='2' unit='M'/></hugepages>")
        let c = CAEnrollmentCheck(xml: noSource)
        #expect(c.problems == [])
        #expect(c.facts.hugepages)
        let withFile = Self.variant("<source type='file'/>", "<hugepages/><source type='file'/>")
        #expect(Self.codes(withFile) == [])
        let withAnon = Self.variant("<source type='file'/>", "<hugepages/><source type='anonymous'/>")
        #expect(Self.codes(withAnon) == [.memorySource])
    }

    @Test func balloonIsRefused() {
        let c = CAEnrollmentCheck(xml: Self.variant("<memballoon model='none'/>", """
            <memballoon model='virtio' freePageReporting='on'><stats period='10'/></memballoon>
            """))
        #expect(c.problems.map(\.code) == [.memoryBalloon])
        #expect(c.problems[0].message.contains("'virtio' with free-page reporting"))
        #expect(c.problems[0].fix == "replace the <memballoon> element with <memballoon model='none'/>")
    }

    @Test func missingBalloonElementIsRefused() {
        // libvirt gives an x86 domain without <memballoon> a virtio balloon.
        let c = CAEnrollmentCheck(xml: Self.variant("<memballoon model='none'/>", ""))
        #expect(c.problems.map(\.code) == [.memoryBalloon])
        #expect(c.problems[0].fix == "add <memballoon model='none'/> to <devices>")
    }

    @Test func memoryDevicesAndHotplugAreRefused() {
        let xml = Self.variant("<memballoon model='none'/>", """
            <memballoon model='none'/>
            <memory model='virtio-mem'><target><size unit='GiB'>2</size><block unit='MiB'>2</block><requested unit='GiB'>1</requested></target></memory>
            <memory model='dimm'><target><size unit='GiB'>1</size><node>0</node></target></memory>
            """).replacingOccurrences(of: "<memory unit='GiB'>4</memory>", with: "<maxMemory slots='16' unit='GiB'>16</maxMemory><memory unit='GiB'>4</memory>")
        let c = CAEnrollmentCheck(xml: xml)
        #expect(c.problems.map(\.code) == [.virtioMem, .memoryDevice, .memoryHotplug])
        #expect(c.problems[0].fix.contains("virtio-mem"))
        #expect(c.problems[1].message.contains("'dimm'"))
        #expect(c.problems[2].fix == "remove the <maxMemory> element")
        #expect(c.facts.memoryKiB == 4 << 20)
    }

    @Test func vhostUserInterfaceAndDiskAreRefused() {
        let xml = Self.variant("<memballoon model='none'/>", """
            <interface type='vhostuser'><mac address='52:54:00:aa:bb:cc'/><source type='unix' path='/tmp/vu.sock' mode='server'/><model type='virtio'/></interface>
            <disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/><source type='unix' path='/tmp/vhost-blk.sock'/><target dev='vdb' bus='virtio'/></disk>
            <filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target dir='srv'/></filesystem>
            <memballoon model='none'/>
            """)
        let c = CAEnrollmentCheck(xml: xml)
        #expect(c.problems.map(\.code) == [.vhostUser, .vhostUser, .vhostUser])
        #expect(c.problems[0].message.contains("52:54:00:aa:bb:cc"))
        #expect(c.problems[0].fix.contains("instead of type 'vhostuser'"))
        #expect(c.problems[1].message.contains("disk vdb"))
        #expect(c.problems[2].message.contains("virtiofs"))
    }

    /// One writable raw file or block disk is replicated and passes; read-only disks and CD-ROMs
    /// pass; what cannot be replicated byte for byte onto the standby's own copy is refused with
    /// the reason and the way out.
    @Test func oneWritableRawOrQCOW2DiskPassesWhatCannotBeReplicatedIsRefused() throws {
        let cdrom = "<disk type='file' device='cdrom'><source file='/srv/boot.iso'/><target dev='sda' bus='sata'/><readonly/></disk>"
        func disk(_ inner: String, type: String = "file", target: String = "vdb") -> String {
            "<disk type='\(type)' device='disk'>\(inner)<target dev='\(target)' bus='virtio'/></disk>"
        }
        let raw = disk("<driver name='qemu' type='raw'/><source file='/var/lib/libvirt/images/data.raw'/>")
        let ok = Self.variant("<memballoon model='none'/>", raw + cdrom + "<memballoon model='none'/>")
        #expect(CAEnrollmentCheck(xml: ok).problems.isEmpty, "\(CAEnrollmentCheck(xml: ok).problems)")
        let chosen = try DomainDisk.replicated(inDomainXML: ok)
        #expect(chosen?.sourcePath == "/var/lib/libvirt/images/data.raw" && chosen?.target == "vdb")
        let block = Self.variant("<memballoon model='none'/>", disk("<driver name='qemu' type='raw'/><source dev='/dev/vg0/billing'/>", type: "block") + "<memballoon model='none'/>")
        #expect(CAEnrollmentCheck(xml: block).problems.isEmpty)
        #expect(try DomainDisk.replicated(inDomainXML: block)?.sourcePath == "/dev/vg0/billing")
        // qcow2 in a file, without a backing chain (none named, or an empty <backingStore/>).
        for backing in ["", "<backingStore/>"] {
            let qcow2 = Self.variant("<memballoon model='none'/>", disk("<driver name='qemu' type='qcow2' cache='none'/><source file='/i/a.qcow2'/>\(backing)") + "<memballoon model='none'/>")
            #expect(CAEnrollmentCheck(xml: qcow2).problems.isEmpty, "\(CAEnrollmentCheck(xml: qcow2).problems)")
            #expect(try DomainDisk.replicated(inDomainXML: qcow2)?.isQCOW2 == true)
        }

        let refused: [(String, String, String)] = [
            (disk("<driver name='qemu' type='vmdk'/><source file='/i/a.vmdk'/>"), "vmdk image", "qemu-img convert -O qcow2"),
            (disk("<driver name='qemu' type='qcow2'/><source file='/i/top.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/></backingStore>"),
             "overlay on the backing image /i/base.qcow2", "flatten it"),
            (disk("<driver name='qemu' type='qcow2'/><source dev='/dev/vg0/q'/>", type: "block"), "qcow2 image on a block device", "<driver type='raw'/>"),
            (disk("<driver name='qemu' type='raw'/><source protocol='rbd' name='pool/img'/>", type: "network"), "network disk", "geminus ha"),
            (disk("<driver name='qemu' type='raw'/><source file='/i/a.raw'/><shareable/>"), "<shareable/>", "remove <shareable/>"),
            (disk("<driver name='qemu' type='raw'/><source file='/i/a.raw'/><transient/>"), "<transient/>", "remove <transient/>"),
            (disk("<driver name='qemu' type='raw' discard='unmap'/><source file='/i/a.raw'/>"), "discard='unmap'", "remove discard='unmap'"),
            (raw + disk("<driver name='qemu' type='raw'/><source file='/i/b.raw'/>", target: "vdc"), "2 writable disks (vdb, vdc)", "<readonly/>"),
        ]
        for (devices, message, fix) in refused {
            let xml = Self.variant("<memballoon model='none'/>", devices + "<memballoon model='none'/>")
            let c = CAEnrollmentCheck(xml: xml)
            #expect(c.problems.map(\.code) == [.unreplicatedDisk], "\(message): \(c.problems)")
            #expect(c.problems.first?.message.contains(message) == true, "\(c.problems)")
            #expect(c.problems.first?.fix.contains(fix) == true, "\(c.problems)")
            #expect(throws: GeminusError.self) { try DomainDisk.replicated(inDomainXML: xml) }
        }
        // A read-only qcow2 is not written: nothing to replicate.
        let ro = Self.variant("<memballoon model='none'/>", disk("<driver name='qemu' type='qcow2'/><source file='/i/a.qcow2'/><readonly/>") + "<memballoon model='none'/>")
        #expect(CAEnrollmentCheck(xml: ro).problems.isEmpty)
        #expect(try DomainDisk.replicated(inDomainXML: ro) == nil)
    }

    @Test func hostdevAndVdpaAreRefused() {
        let xml = Self.variant("<memballoon model='none'/>", """
            <hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>
            <hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0xbeef'/></source></hostdev>
            <interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000' bus='0x04' slot='0x10' function='0x1'/></source></interface>
            <interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>
            <shmem name='ivshmem0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>
            <memballoon model='none'/>
            """)
        let c = CAEnrollmentCheck(xml: xml)
        #expect(c.problems.map(\.code) == [.hostdev, .vdpa, .hostdev, .hostdev, .sharedMemoryDevice])
        let pci = c.problems.first { $0.message.contains("<hostdev type='pci'>") }
        #expect(pci?.message.contains("VFIO") == true)
        #expect(pci?.fix == "remove the <hostdev type='pci'> device; give the guest an emulated or virtio device instead")
        #expect(c.problems.contains { $0.message.contains("<hostdev type='usb'>") })
    }

    @Test func everyProblemAtOnceBecomesOneOperatorError() {
        let xml = """
        <domain type='kvm'><name>bad</name><memory>1048576</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type></os>
          <devices><hostdev mode='subsystem' type='pci'/></devices></domain>
        """
        let c = CAEnrollmentCheck(xml: xml)
        #expect(c.problems.map(\.code) == [.memorySource, .memoryAccess, .memoryBalloon, .hostdev, .privateQMP])
        #expect(c.facts.memoryKiB == 1048576)
        let e = c.error
        #expect(e?.code == .invalidArgument)
        #expect(e?.message.hasPrefix("domain 'bad' cannot be protected in CA mode: ") == true)
        #expect(e?.fix?.contains("geminus enroll --prepare") == true)
    }

    @Test func brokenXMLIsOneProblem() {
        #expect(Self.codes("<domain type='kvm'><name>x</domain>") == [.invalidXML])
        #expect(Self.codes("<network><name>default</name></network>") == [.invalidXML])
    }

    @Test func memoryUnits() {
        #expect(CAEnrollmentCheck.kibibytes("128", unit: "MiB") == 131072)
        #expect(CAEnrollmentCheck.kibibytes("128", unit: "M") == 131072)
        #expect(CAEnrollmentCheck.kibibytes("1000000", unit: "KB") == 976562)
        #expect(CAEnrollmentCheck.kibibytes("2048", unit: nil) == 2048)
        #expect(CAEnrollmentCheck.kibibytes("1", unit: "GB") == 976562)
        #expect(CAEnrollmentCheck.kibibytes("4096", unit: "bytes") == 4)
        #expect(CAEnrollmentCheck.kibibytes("x", unit: "KiB") == nil)
        #expect(CAEnrollmentCheck.kibibytes("1", unit: "parsec") == nil)
    }

    // MARK: prepare()

    static let needsPreparing = """
    <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
      <name>billing-2</name>
      <memory unit='KiB'>2097152</memory>
      <currentMemory unit='KiB'>2097152</currentMemory>
      <vcpu placement='static'>2</vcpu>
      <!-- keep me -->
      <os>
        <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
      </os>
      <devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <interface type='bridge'>
          <mac address='52:54:00:01:02:03'/>
          <source bridge='br0'/>
          <model type='virtio'/>
        </interface>
        <memballoon model='virtio'>
          <stats period='5'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
        </memballoon>
      </devices>
      <qemu:commandline>
        <qemu:arg value='-qmp'/>
      </qemu:commandline>
    </domain>
    """

    @Test func prepareFixesBackingAndBalloonAndKeepsTheRest() throws {
        #expect(Self.codes(Self.needsPreparing) == [.memorySource, .memoryAccess, .memoryBalloon, .unheldInterface, .privateQMP])
        let out = try CAEnrollmentCheck.prepare(Self.needsPreparing)
        let c = CAEnrollmentCheck(xml: out)
        #expect(c.problems == [])
        let before = CAEnrollmentCheck(xml: Self.needsPreparing).facts
        #expect(c.facts == before)
        // Unrelated content survives.
        for kept in ["<!-- keep me -->", "<mac address=\"52:54:00:01:02:03\"/>", "<model type=\"virtio\"/>",
                     "<qemu:arg value=\"-qmp\"/>", "xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\"",
                     "<emulator>/usr/bin/qemu-system-x86_64</emulator>", "<vcpu placement=\"static\">2</vcpu>"] {
            #expect(out.contains(kept), "prepare() lost \(kept)")
        }
        #expect(out.contains("<memballoon model=\"none\"/>"))
        #expect(!out.contains("<stats"))
        #expect(!out.contains("slot=\"0x05\""))
        #expect(out.contains("<memoryBacking><source type=\"file\"/><access mode=\"shared\"/></memoryBacking>"))
        // The new element goes after <currentMemory>, indented like its siblings.
        #expect(out.contains("</currentMemory>\n  <memoryBacking>"))
        // Idempotent.
        #expect(try CAEnrollmentCheck.prepare(out) == out)
    }

    @Test func prepareKeepsHugepagesAndFixesExistingBacking() throws {
        let xml = Self.variant("<source type='file'/>", "<hugepages/><locked/>")
            .replacingOccurrences(of: "<access mode='shared'/>", with: "<access mode='private'/>")
        let out = try CAEnrollmentCheck.prepare(xml)
        #expect(CAEnrollmentCheck(xml: out).problems == [])
        #expect(out.contains("<hugepages/>"))
        #expect(out.contains("<locked/>"))
        #expect(!out.contains("<source type=\"file\"/>"))
        #expect(out.contains("<access mode=\"shared\"/>"))

        let hugeMemfd = try CAEnrollmentCheck.prepare(Self.variant("<source type='file'/>", "<hugepages/><source type='memfd'/>"))
        #expect(!hugeMemfd.contains("memfd"))
        #expect(hugeMemfd.contains("<hugepages/>"))
        #expect(CAEnrollmentCheck(xml: hugeMemfd).problems == [])

        let memfd = try CAEnrollmentCheck.prepare(Self.variant("<source type='file'/>", "<source type='memfd'/>"))
        #expect(memfd.contains("<source type=\"file\"/>"))
        #expect(CAEnrollmentCheck(xml: memfd).problems == [])
    }

    @Test func prepareLeavesOtherProblemsForTheOperator() throws {
        let xml = Self.variant("<memballoon model='none'/>", """
            <hostdev mode='subsystem' type='pci'/>
            """)
        let out = try CAEnrollmentCheck.prepare(xml)
        #expect(CAEnrollmentCheck(xml: out).problems.map(\.code) == [.hostdev])
    }

    @Test func prepareBuildsWhatIsMissing() throws {
        let bare = "<domain type='qemu'><name>x</name><memory>65536</memory></domain>"
        let out = try CAEnrollmentCheck.prepare(bare)
        #expect(CAEnrollmentCheck(xml: out).problems == [])
        #expect(out.contains("<devices><memballoon model=\"none\"/></devices>"))
        #expect(out.contains("<qemu:commandline><qemu:arg value=\"-qmp\"/><qemu:arg value=\"unix:/run/geminus/qmp/x.sock,server=on,wait=off\"/></qemu:commandline>"))
        #expect(out.contains("xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\""))
        #expect(CAEnrollmentCheck(xml: try CAEnrollmentCheck.prepare("<domain type='kvm'><name>y</name></domain>")).problems == [])
        // Without a name the socket cannot be named: that problem stays.
        #expect(CAEnrollmentCheck(xml: try CAEnrollmentCheck.prepare("<domain type='kvm'/>")).problems.map(\.code) == [.privateQMP])
    }

    // MARK: Private QMP socket

    /// `xml` with libvirt's QEMU namespace bound to the prefix `q` instead of `qemu`.
    static func otherPrefix(_ xml: String) -> String {
        xml.replacingOccurrences(of: "qemu:", with: "q:").replacingOccurrences(of: "xmlns:qemu=", with: "xmlns:q=")
    }

    @Test func missingPrivateQMPIsRefusedWithTheFix() {
        let without = Self.variant("""
              <qemu:commandline>
                <qemu:arg value='-qmp'/>
                <qemu:arg value='unix:/run/geminus/qmp/billing-1.sock,server=on,wait=off'/>
              </qemu:commandline>

            """, "")
        let c = CAEnrollmentCheck(xml: without)
        #expect(c.problems.map(\.code) == [.privateQMP])
        #expect(c.problems.first?.fix.contains("geminus enroll billing-1 --prepare") == true)
        #expect(c.problems.first?.message.contains("unix:/run/geminus/qmp/billing-1.sock,server=on,wait=off") == true)
        #expect(CAEnrollmentCheck.Code.privateQMP.rawValue == "private-qmp")
        // Another socket (the old recipe's path) is not the agent's.
        #expect(Self.codes(Self.variant("/run/geminus/qmp/billing-1.sock", "/run/geminus/billing-1.qmp")) == [.privateQMP])
        // The arguments in another namespace prefix count; outside the QEMU namespace they do not.
        #expect(Self.codes(Self.otherPrefix(Self.good)) == [])
        #expect(Self.codes(Self.good.replacingOccurrences(of: "http://libvirt.org/schemas/domain/qemu/1.0", with: "urn:other")) == [.privateQMP])
    }

    @Test func preparedPrivateQMPKeepsOtherArgumentsAndIsIdempotent() throws {
        let xml = Self.variant("<qemu:arg value='-qmp'/>\n    <qemu:arg value='unix:/run/geminus/qmp/billing-1.sock,server=on,wait=off'/>",
                               "<qemu:arg value='-d'/>\n    <qemu:arg value='guest_errors'/>")
        #expect(Self.codes(xml) == [.privateQMP])
        let out = try CAEnrollmentCheck.prepare(xml)
        #expect(Self.codes(out) == [])
        #expect(out.contains("<qemu:arg value=\"-d\"/>"))
        #expect(out.contains("<qemu:arg value=\"guest_errors\"/>"))
        #expect(out.components(separatedBy: "<qemu:commandline>").count == 2)
        #expect(try CAEnrollmentCheck.prepare(out) == out)
        // A domain already right gets no second socket.
        let good = try CAEnrollmentCheck.prepare(Self.good)
        #expect(good.components(separatedBy: "/run/geminus/qmp/billing-1.sock").count == 2)
        // With another prefix, the arguments go into that element.
        let other = try CAEnrollmentCheck.prepare(Self.otherPrefix(xml))
        #expect(other.contains("<q:arg value=\"unix:/run/geminus/qmp/billing-1.sock,server=on,wait=off\"/>"))
        #expect(Self.codes(other) == [])
    }

    @Test func addingQEMUArgumentsAddsEachMissingGroupOnce() throws {
        let groups = [["-incoming", "defer"], ["-global", "migration.send-configuration=off"]]
        let once = try CAEnrollmentCheck.addingQEMUArguments(Self.good, groups)
        #expect(try CAEnrollmentCheck.addingQEMUArguments(once, groups) == once)
        #expect(once.contains("<qemu:arg value=\"-incoming\"/><qemu:arg value=\"defer\"/>") || once.contains("<qemu:arg value=\"-incoming\"/>\n"))
        #expect(Self.codes(once) == [])
    }

    @Test func peerFactsComparison() {
        let a = CAEnrollmentCheck(xml: Self.good).facts
        var b = a
        b.name = "other-name"
        b.uuid = nil
        #expect(a.differences(from: b) == [])
        b.machineType = "pc-q35-8.0"
        b.memoryKiB = 2 << 20
        b.emulator = nil
        #expect(a.differences(from: b) == [
            "machine type: pc-q35-7.2 here, pc-q35-8.0 on the peer",
            "emulator: /usr/bin/qemu-system-x86_64 here, not set on the peer",
            "memory (KiB): 4194304 here, 2097152 on the peer",
        ])
    }

    @Test func prepareRefusesNonDomainXML() {
        #expect(throws: GeminusError.self) { try CAEnrollmentCheck.prepare("<network/>") }
        #expect(throws: GeminusError.self) { try CAEnrollmentCheck.prepare("<domain") }
    }
}
