import Foundation
import Testing
import GeminusCore
@testable import GeminusQEMU
#if canImport(Glibc)
import Glibc
#endif

/// The agent's local surface with `--guest qemu` (review H3, M7, M4): its files live in a
/// private run directory, are created by the agent (0600, exclusively, never through a link),
/// and its sockets talk only to the QEMU it started.
@Suite(.serialized) struct HostSurfaceTests {
    /// A fresh directory private to this test (mode 0700 under the agent's run directory's
    /// parent), removed afterwards.
    static func privateDirectory() -> String {
        let tmp = NSTemporaryDirectory().hasSuffix("/") ? String(NSTemporaryDirectory().dropLast()) : NSTemporaryDirectory()
        var template = Array("\(tmp)/geminus-surface-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        return String(cString: made!)
    }

    static func mode(_ path: String) -> mode_t? {
        var st = stat()
        return lstat(path, &st) == 0 ? st.st_mode & 0o7777 : nil
    }

    static func failure(_ body: () throws(GeminusError) -> Void) -> GeminusError? {
        do { try body() } catch { return error }
        return nil
    }

    // MARK: The run directory (H3)

    @Test func theAgentsRunDirectoryIsPrivate() throws {
        let dir = RunDirectory.agent
        var st = stat()
        #expect(lstat(dir, &st) == 0)
        #expect(st.st_mode & S_IFMT == S_IFDIR)
        #expect(st.st_uid == geteuid())
        #expect(st.st_mode & 0o7777 == 0o700)
        try RunDirectory.checkPrivate(dir)
        let c = QEMUGuestConfig.standard(tag: "t", ramMiB: 32, kernelPath: "/k", append: "")
        #expect(c.allFiles.allSatisfy { ($0 as NSString).deletingLastPathComponent == dir }, "every file of a guest in the run directory: \(c.allFiles)")
    }

    @Test func aSharedOrLinkedRunDirectoryIsRefused() throws {
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let open = dir + "/open"
        mkdir(open, 0o700)
        chmod(open, 0o1777)
        let shared = Self.failure { () throws(GeminusError) in try RunDirectory.checkPrivate(open) }
        #expect(shared?.message.contains("mode 01777, not 0700") == true, "\(String(describing: shared))")
        let link = dir + "/link"
        symlink(dir, link)
        let linked = Self.failure { () throws(GeminusError) in try RunDirectory.checkPrivate(link) }
        #expect(linked?.message.contains("not a directory") == true, "\(String(describing: linked))")
        // QEMU is not started with its files in /tmp (world-writable).
        var c = QEMUGuestConfig.standard(tag: "t-\(getpid())", ramMiB: 32, kernelPath: "/nonexistent", append: "", runDirectory: open)
        c.qemuBinary = "/bin/true"
        let start = Self.failure { () throws(GeminusError) in _ = try QEMULauncher.start(c) }
        #expect(start?.message.contains("the run directory \(open) has mode 01777") == true, "\(String(describing: start))")
        #expect(access(c.ramFilePath, F_OK) != 0, "nothing created there")
    }

    // MARK: Files created by the agent (H3)

    /// A file or a link planted where the fresh primary's RAM file goes is refused before
    /// QEMU starts, and the link's target is left alone (QEMU would open an existing file).
    @Test func aPlantedRAMFileOrLinkIsRefused() throws {
        let victim = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: victim) }
        let target = victim + "/target"
        _ = FileManager.default.createFile(atPath: target, contents: Data("keep".utf8))
        for plant in ["file", "link"] {
            let c = QEMUGuestConfig.standard(tag: "gq-\(getpid())-planted-\(plant)", ramMiB: 32, kernelPath: "/nonexistent", append: "")
            if plant == "file" {
                _ = FileManager.default.createFile(atPath: c.ramFilePath, contents: Data("theirs".utf8))
            } else {
                symlink(target, c.ramFilePath)
            }
            defer { unlink(c.ramFilePath) }
            let error = Self.failure { () throws(GeminusError) in _ = try QEMUGuest.launch(c, counterAddress: nil) }
            #expect(error?.message.contains("cannot create the RAM file \(c.ramFilePath): something is already there") == true, "\(plant): \(String(describing: error))")
            #expect(error?.fix?.contains("leftover") == true)
        }
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "keep")
    }

    @Test func privateFilesAreCreatedExclusivelyAndNeverThroughALink() throws {
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fd = try PrivateFile.createNew(dir + "/new", what: "the test file")
        close(fd)
        #expect(Self.mode(dir + "/new") == 0o600)
        #expect(Self.failure { () throws(GeminusError) in close(try PrivateFile.createNew(dir + "/new", what: "the test file")) }?.message.contains("already there") == true)

        symlink(dir + "/new", dir + "/link")
        let linked = Self.failure { () throws(GeminusError) in close(try PrivateFile.openOrCreate(dir + "/link", what: "the test file").fd) }
        #expect(linked?.message.contains("is a symbolic link") == true, "\(String(describing: linked))")

        _ = FileManager.default.createFile(atPath: dir + "/loose", contents: nil)
        chmod(dir + "/loose", 0o644)
        let loose = Self.failure { () throws(GeminusError) in close(try PrivateFile.openOrCreate(dir + "/loose", what: "the test file").fd) }
        #expect(loose?.message.contains("mode 0644") == true, "\(String(describing: loose))")

        _ = FileManager.default.createFile(atPath: dir + "/theirs", contents: nil)
        chmod(dir + "/theirs", 0o600)
        if geteuid() == 0, chown(dir + "/theirs", 65534, 65534) == 0 {
            let theirs = Self.failure { () throws(GeminusError) in close(try PrivateFile.openOrCreate(dir + "/theirs", what: "the test file").fd) }
            #expect(theirs?.message.contains("belongs to uid 65534") == true, "\(String(describing: theirs))")
        }
    }

    @Test func disksAreNotCreatedThroughPlantedLinks() throws {
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let target = dir + "/target"
        _ = FileManager.default.createFile(atPath: target, contents: Data("keep".utf8))
        let setup = DiskSetup(path: dir + "/disk", sizeBytes: 1 << 20, exportSocketPath: dir + "/nbd")
        symlink(target, setup.path)
        let primary = Self.failure { () throws(GeminusError) in try ReplicatedDisk.createEmpty(setup) }
        #expect(primary?.message.contains("something is already there") == true, "\(String(describing: primary))")
        let replica = Self.failure { () throws(GeminusError) in _ = try FileReplicaDisk(path: setup.path, sizeBytes: 1 << 20) }
        #expect(replica?.message.contains("is a symbolic link") == true, "\(String(describing: replica))")
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "keep", "the link's target untouched")

        unlink(setup.path)
        try ReplicatedDisk.createEmpty(setup)
        #expect(Self.mode(setup.path) == 0o600)
    }

    /// After an agent-style launch, the RAM file and the device-state file are the agent's
    /// alone (QEMU created the RAM file 0644 before: any local user could read guest memory).
    @Test(.enabled(if: VMEnv.enabled, VMEnv.skipReason)) func theRAMAndDeviceStateFilesAre0600() throws {
        guard let kernel = VMEnv.requireGuest() else { return }
        let c = VMEnv.config(kernel: kernel, role: "modes")
        let guest = try QEMUGuest.launch(c, counterAddress: QEMUGuest.tinyGuestCounterAddress).guest
        defer { guest.shutdown() }
        try VMEnv.waitBooted(guest.memory)
        #expect(Self.mode(c.ramFilePath) == 0o600)
        #expect(Self.mode((c.ramFilePath as NSString).deletingLastPathComponent) == 0o700)
        try guest.pause()
        try guest.capture(full: true, into: CheckpointBuffer(limitPages: guest.pageCount))
        try guest.resume()
        #expect(Self.mode(guest.deviceStatePath) == 0o600)
        #expect((c.qmpSocketPath as NSString).deletingLastPathComponent == (c.ramFilePath as NSString).deletingLastPathComponent,
                "the QMP socket is in the private directory")
    }

    // MARK: Socket peers (H3, M9)

    /// Runs a QMP server that greets and answers every command, as `user` when given.
    final class FakeQMPProcess {
        let process = Process()
        init(path: String, asUser user: String? = nil) throws {
            let script = """
            import json, os, socket, sys
            p = sys.argv[1]
            s = socket.socket(socket.AF_UNIX)
            s.bind(p)
            os.chmod(p, 0o777)
            s.listen(4)
            print("ready", flush=True)
            while True:
                c, _ = s.accept()
                try:
                    c.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\\n')
                    for line in c.makefile("rb"):
                        c.sendall(b'{"return": {}}\\n')
                except OSError:
                    pass
                c.close()
            """
            let python = "/usr/bin/python3"
            if let user {
                process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
                process.arguments = ["--reuid=\(user)", "--regid=\(user == "nobody" ? "nogroup" : user)", "--clear-groups", python, "-c", script, path]
            } else {
                process.executableURL = URL(fileURLWithPath: python)
                process.arguments = ["-c", script, path]
            }
            let out = Pipe()
            process.standardOutput = out
            try process.run()
            let line = String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
            guard line.contains("ready") else { throw GeminusError(.io, "fake QMP server did not start: \(line)") }
        }
        func stop() {
            // SIGKILL: the test runner's blocked SIGTERM is inherited by its children.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    @Test func aQMPServerOfAnotherProcessIsRefused() throws {
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/fake.qmp"
        let fake = try FakeQMPProcess(path: path)
        defer { fake.stop() }
        // As if the agent had started QEMU as this process: the fake is another one.
        let error = Self.failure { () throws(GeminusError) in _ = try QMPClient(socketPath: path, connectTimeout: 2, peer: .process(getpid())) }
        #expect(error?.message.contains("is served by process \(fake.process.processIdentifier)") == true, "\(String(describing: error))")
        #expect(error?.message.contains("refusing to talk to it") == true)
        // The process it is: accepted.
        let qmp = try QMPClient(socketPath: path, connectTimeout: 2, peer: .process(fake.process.processIdentifier))
        qmp.close()
    }

    @Test func aQMPServerOfAnotherUserIsRefused() throws {
        guard geteuid() == 0 else { return }  // running a process as nobody needs root
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        chmod(dir, 0o777)  // so that nobody can bind there
        let path = dir + "/fake.qmp"
        let fake = try FakeQMPProcess(path: path, asUser: "nobody")
        defer { fake.stop() }
        let error = Self.failure { () throws(GeminusError) in _ = try QMPClient(socketPath: path, connectTimeout: 2) }
        #expect(error?.message.contains("(uid 65534), not by a process of uid \(geteuid())") == true, "\(String(describing: error))")
        // The serial console and the NBD client check the same way.
        let serial = Self.failure { () throws(GeminusError) in _ = try SerialOutput(socketPath: path, timeout: 2) }
        #expect(serial?.message.contains("refusing to talk to it") == true, "\(String(describing: serial))")
    }

    /// A NIC or disk-export socket takes the connection of the QEMU it expects only; another
    /// process's is closed unread.
    @Test func anUnexpectedClientOfAListeningSocketIsDisconnected() throws {
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/nic"
        let listener = try UnixSocket.listen(path: path, what: "the NIC socket")
        defer { close(listener); UnixSocket.forget(listener) }
        #expect(Self.mode(path) == 0o600)
        UnixSocket.expect(.process(getpid() + 100_000), onListenerAt: path)
        let before = UnixSocket.refusedPeers.count
        let client = try UnixSocket.connect(path: path, timeout: 1, what: "the NIC socket")
        defer { close(client) }
        var polls = 0
        #expect(UnixSocket.accept(listener, keepWaiting: { polls += 1; return polls < 5 }) == nil)
        #expect(UnixSocket.refusedPeers.count == before + 1)
        #expect(UnixSocket.refusedPeers.last?.contains("not by process \(getpid() + 100_000)") == true)

        UnixSocket.expect(.process(getpid()), onListenerAt: path)
        let again = try UnixSocket.connect(path: path, timeout: 1, what: "the NIC socket")
        defer { close(again) }
        let accepted = UnixSocket.accept(listener, keepWaiting: { true })
        #expect(accepted != nil)
        if let accepted { close(accepted) }
    }

    // MARK: The preload library (M7)

    @Test func aPreloadLibraryOthersCanReplaceIsRefused() throws {
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let library = dir + "/" + WriteTrackingPreload.fileName
        _ = FileManager.default.createFile(atPath: library, contents: Data("x".utf8))
        chmod(library, 0o644)
        // Under /tmp (every user may write there).
        let error = Self.failure { () throws(GeminusError) in _ = try WriteTrackingPreload.checkTrusted(library) }
        #expect(error?.message.contains("refusing it") == true, "\(String(describing: error))")
        #expect(error?.fix?.contains("/usr/local/lib/geminus/\(WriteTrackingPreload.fileName)") == true, "\(String(describing: error?.fix))")
        #expect(error?.fix?.contains("Tools/uffd-preload/install.sh") == true)
        // GEMINUS_UFFD_PRELOAD is checked like any other path.
        let env = [WriteTrackingPreload.environmentVariable: library]
        #expect(WriteTrackingPreload.locate(environment: env) == nil)
        let required = Self.failure { () throws(GeminusError) in _ = try WriteTrackingPreload.require(environment: env) }
        #expect(required?.message.hasPrefix("\(WriteTrackingPreload.environmentVariable)=\(library): ") == true, "\(String(describing: required))")
        // A library its user may write, in a root-only directory: refused too.
        guard geteuid() == 0 else { return }
        var template = Array("/run/geminus-preload-test-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        let root = String(cString: try #require(made))
        defer { try? FileManager.default.removeItem(atPath: root) }
        chmod(root, 0o755)
        let installed = root + "/" + WriteTrackingPreload.fileName
        _ = FileManager.default.createFile(atPath: installed, contents: Data("x".utf8))
        chmod(installed, 0o664)
        #expect(Self.failure { () throws(GeminusError) in _ = try WriteTrackingPreload.checkTrusted(installed) }?.message.contains("mode 0664") == true)
        chmod(installed, 0o644)
        symlink(installed, root + "/link.so")
        #expect(try WriteTrackingPreload.checkTrusted(root + "/link.so") == installed, "accepted, by its real path")
        chown(installed, 65534, 65534)
        #expect(Self.failure { () throws(GeminusError) in _ = try WriteTrackingPreload.checkTrusted(installed) }?.message.contains("belongs to uid 65534") == true)
    }

    // MARK: A full tmpfs (M4)

    /// The standby's RAM file cannot be reserved on a full filesystem: an error before any
    /// replica write, not a SIGBUS mid-commit.
    @Test func aFullTmpfsIsAnErrorBeforeAnyWrite() throws {
        guard geteuid() == 0 else { return }  // mounting needs root
        let dir = Self.privateDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        guard mount("tmpfs", dir, "tmpfs", 0, "size=1m,mode=0700") == 0 else {
            Issue.record("cannot mount a small tmpfs: \(String(cString: strerror(errno)))")
            return
        }
        defer { umount(dir) }
        let path = dir + "/replica.ram"
        let error = Self.failure { () throws(GeminusError) in try QEMUStandby.preallocate(path: path, bytes: 4 << 20) }
        #expect(error?.code == .resourceExhausted)
        #expect(error?.message.contains("cannot reserve 4 MiB for the replica RAM file \(path)") == true, "\(String(describing: error))")
        #expect(error?.fix?.contains("free space on the filesystem of \(dir)") == true)
        #expect(access(path, F_OK) != 0, "no half-reserved file left")
    }
}
