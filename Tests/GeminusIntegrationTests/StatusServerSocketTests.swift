import Foundation
import GeminusAgent
import GeminusCore
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The status socket's creation (review L4): owner-only from its first instant without
/// touching the process's umask, and a directory that cannot be made is said so.
@Suite(.serialized) struct StatusServerSocketTests {
    @Test func aDirectoryThatCannotBeMadeIsAnError() throws {
        let s = try Scratch()
        defer { s.remove() }
        let path = s.path("missing/deeper/status.sock")
        do {
            let server = try StatusServer(path: path, status: AgentStatus())
            server.close()
            Issue.record("a status socket in a directory that cannot be made")
        } catch {
            #expect(error.message.contains("cannot create the status socket's directory \(s.path("missing/deeper"))"), "\(error)")
            #expect(error.fix?.contains("--status-socket") == true)
        }
    }

    /// Other threads of the agent create files while the status socket is bound; none of them
    /// may get the socket's restrictive mode (the umask was process-wide for the bind).
    @Test func bindingTheSocketLeavesOtherThreadsFilesAlone() throws {
        let s = try Scratch()
        defer { s.remove() }
        let oldMask = umask(0o022)
        defer { umask(oldMask) }
        let stop = ManagedAtomicFlag()
        let wrongModes = ManagedAtomicCounter()
        let writer = Thread {
            var n = 0
            while !stop.isSet {
                let path = s.path("f\(n % 8)")
                unlink(path)
                let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o644)
                if fd >= 0 {
                    var st = stat()
                    if fstat(fd, &st) == 0 && st.st_mode & 0o777 != 0o644 { wrongModes.increment() }
                    close(fd)
                }
                n += 1
            }
        }
        writer.start()
        for i in 0..<1500 {
            let server = try StatusServer(path: s.path("s\(i % 4).sock"), status: AgentStatus())
            var st = stat()
            #expect(lstat(server.path, &st) == 0 && st.st_mode & 0o777 == 0o600, "the socket is owner-only")
            server.close()
        }
        stop.set()
        Thread.sleep(forTimeInterval: 0.05)
        #expect(wrongModes.value == 0, "files of other threads created with the status socket's umask")
    }
}

final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var flag = false
    var isSet: Bool { lock.withLock { flag } }
    func set() { lock.withLock { flag = true } }
}

final class ManagedAtomicCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    var value: Int { lock.withLock { count } }
    func increment() { lock.withLock { count += 1 } }
}
