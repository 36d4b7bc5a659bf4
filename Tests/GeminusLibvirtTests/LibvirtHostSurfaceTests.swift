import Foundation
import Testing
import GeminusCore
@testable import GeminusLibvirt
@testable import GeminusLibvirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The libvirt side of the agent's local surface (review M9, M4): the private QMP directory,
/// the RAM file QEMU names, and the standby's RAM reservation. No libvirt daemon needed.
@Suite(.serialized) struct LibvirtHostSurfaceTests {
    static func scratch() -> String {
        let tmp = NSTemporaryDirectory().hasSuffix("/") ? String(NSTemporaryDirectory().dropLast()) : NSTemporaryDirectory()
        var template = Array("\(tmp)/geminus-lvsurface-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        return String(cString: made!)
    }

    static func failure(_ body: () throws(GeminusError) -> Void) -> GeminusError? {
        do { try body() } catch { return error }
        return nil
    }

    static func stat(_ path: String) -> Glibc.stat? {
        var st = Glibc.stat()
        return lstat(path, &st) == 0 ? st : nil
    }

    // MARK: The private QMP directory (M9)

    /// With no known QEMU user the directory is not opened to everyone (it was 1733): the
    /// agent refuses and says how to name the user.
    @Test func anUnknownQEMUUserIsRefusedNotWorldWritable() throws {
        let before = Self.stat(PrivateQMP.directory)
        let error = Self.failure { () throws(GeminusError) in try PrivateQMP.ensureDirectory(qemuUser: "no-such-user-geminus") }
        #expect(error?.message.contains("QEMU's user no-such-user-geminus does not exist") == true, "\(String(describing: error))")
        #expect(error?.fix?.contains("/etc/libvirt/qemu.conf") == true)
        if let after = Self.stat(PrivateQMP.directory) {
            #expect(after.st_mode & 0o002 == 0, "never world-writable")
            #expect(before.map { $0.st_mode } == after.st_mode, "left as it was")
        }
        let conf = LibvirtQEMUConf(user: nil)
        let guessed = Self.failure { () throws(GeminusError) in _ = try conf.qemuUser(candidates: ["no-such-user-geminus"]) }
        #expect(guessed?.message.contains("cannot tell which user libvirt runs QEMU as") == true)
        #expect(guessed?.fix?.contains("set `user = \"NAME\"`") == true)
    }

    @Test func theDirectoryBelongsToQEMUsUserAndOnlyToIt() throws {
        guard geteuid() == 0 else { return }  // chown needs root
        let dir = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let qmp = dir + "/run/qmp"
        // Left world-writable by an older agent: repaired.
        mkdir(dir + "/run", 0o755)
        mkdir(qmp, 0o700)
        chmod(qmp, 0o1733)
        try PrivateQMP.ensureDirectory(qemuUser: "nobody", directory: qmp, conf: LibvirtQEMUConf())
        let st = try #require(Self.stat(qmp))
        #expect(st.st_uid == 65534 && st.st_mode & 0o7777 == 0o750)
        try PrivateQMP.ensureDirectory(directory: qmp, conf: LibvirtQEMUConf(user: "root"))
        let root = try #require(Self.stat(qmp))
        #expect(root.st_uid == 0 && root.st_mode & 0o7777 == 0o700, "QEMU as root: root's alone")
        // A link in its place is refused.
        try FileManager.default.removeItem(atPath: qmp)
        symlink("/tmp", qmp)
        let linked = Self.failure { () throws(GeminusError) in try PrivateQMP.ensureDirectory(qemuUser: "root", directory: qmp, conf: LibvirtQEMUConf()) }
        #expect(linked?.message.contains("not a directory") == true, "\(String(describing: linked))")
    }

    @Test func qemuConfIsRead() {
        let conf = LibvirtQEMUConf(text: """
        #user = "libvirt-qemu"
        user = "qemu"   # RHEL
        # memory_backing_dir = "/var/lib/libvirt/qemu/ram"
        memory_backing_dir = "/dev/shm/vmram"
        """)
        #expect(conf == LibvirtQEMUConf(user: "qemu", memoryBackingDirectory: "/dev/shm/vmram"))
        #expect(LibvirtQEMUConf(text: "") == LibvirtQEMUConf(user: nil, memoryBackingDirectory: "/var/lib/libvirt/qemu/ram"))
    }

    // MARK: The RAM file QEMU names (M9)

    @Test func onlyARegularRAMFileOfTheDefinedSizeUnderTheBackingDirectoryIsOpened() throws {
        let dir = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = dir + "/ram"
        mkdir(base, 0o700)
        mkdir(base + "/1-vm", 0o700)
        let conf = LibvirtQEMUConf(memoryBackingDirectory: base)
        let good = base + "/1-vm/pc.ram"
        _ = FileManager.default.createFile(atPath: good, contents: Data(count: 8 * 4096))
        let outside = dir + "/elsewhere.ram"
        _ = FileManager.default.createFile(atPath: outside, contents: Data(count: 8 * 4096))

        let fd = try LibvirtGuest.openRAMFile(good, domainName: "vm", expectedBytes: 8 * 4096, conf: conf)
        close(fd)

        func refusal(_ path: String, _ bytes: Int? = 8 * 4096) -> String {
            (Self.failure { () throws(GeminusError) in close(try LibvirtGuest.openRAMFile(path, domainName: "vm", expectedBytes: bytes, conf: conf)) })?.message ?? "accepted"
        }
        #expect(refusal(outside).contains("is not under libvirt's memory backing directory"))
        symlink(outside, base + "/1-vm/out.ram")
        #expect(refusal(base + "/1-vm/out.ram").contains("is not under libvirt's memory backing directory"), "a link leading out")
        symlink(good, base + "/1-vm/in.ram")
        #expect(refusal(base + "/1-vm/in.ram").contains("is a symbolic link"), "a link inside")
        #expect(refusal(good, 16 * 4096).contains("has 32768 bytes, the domain is defined with 65536"))
        mkdir(base + "/1-vm/dir.ram", 0o700)
        #expect(refusal(base + "/1-vm/dir.ram").contains("not a regular file") || refusal(base + "/1-vm/dir.ram").contains("cannot open"))
    }

    // MARK: The standby's RAM reservation (M4)

    /// On a full tmpfs the reservation of the standby's RAM file fails as an error (it was
    /// ignored, and the first commit then died of SIGBUS with a torn replica).
    @Test func aFullTmpfsIsAnErrorBeforeAnyReplicaWrite() throws {
        guard geteuid() == 0 else { return }  // mounting needs root
        let dir = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        guard mount("tmpfs", dir, "tmpfs", 0, "size=1m,mode=0700") == 0 else {
            Issue.record("cannot mount a small tmpfs: \(String(cString: strerror(errno)))")
            return
        }
        defer { umount(dir) }
        let path = dir + "/pc.ram"
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        truncate(path, 4 << 20)  // as QEMU sizes it: sparse, nothing reserved
        let error = Self.failure { () throws(GeminusError) in try LibvirtStandby.reserveRAM(path: path, bytes: 4 << 20) }
        #expect(error?.code == .resourceExhausted, "\(String(describing: error))")
        #expect(error?.message.contains("cannot reserve 4 MiB for the replica RAM file \(path)") == true)
    }
}
