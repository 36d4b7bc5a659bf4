import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Runs a script of the source tree and waits for it, its output sent where the demo wants it.
/// Spawned directly, not with Foundation's Process: Process learns that its child exited when a
/// socket the child inherits closes, and daemons a script leaves running (libvirtd from
/// Tools/start-libvirt) would inherit it too and hold it open (seen: the demo waited for
/// start-libvirt until killed). Here the child gets no descriptor beyond 0-2 and no blocked
/// signals.
enum ChildProcess {
    /// Where one of the child's output streams goes.
    enum Sink {
        /// This process's descriptor (1 or 2).
        case descriptor(Int32)
        case discard
    }

    /// The exit status, or 128 + the signal that killed it, as a shell says; -1 if it could not
    /// be started.
    static func run(_ path: String, _ arguments: [String], stdout: Sink, stderr: Sink) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        var attributes = posix_spawnattr_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawnattr_init(&attributes)
        defer {
            posix_spawn_file_actions_destroy(&actions)
            posix_spawnattr_destroy(&attributes)
        }
        // The child's stderr first: when it is to be this process's stdout, descriptor 1 must
        // still be that when it is copied (file actions run in order). (Swapping 1 and 2 is not
        // supported: nothing needs it.)
        for (target, sink) in [(Int32(2), stderr), (Int32(1), stdout)] {
            switch sink {
            case .descriptor(let fd) where fd != target: posix_spawn_file_actions_adddup2(&actions, fd, target)
            case .descriptor: break
            case .discard: posix_spawn_file_actions_addopen(&actions, target, "/dev/null", O_WRONLY, 0)
            }
        }
        // Every descriptor above 2 closed in the child (glibc ignores one closed meanwhile).
        for fd in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd"))?.compactMap({ Int32($0) }) ?? [] where fd > 2 {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
        var none = sigset_t(), defaults = sigset_t()
        sigemptyset(&none)
        sigemptyset(&defaults)
        for s in [SIGINT, SIGTERM, SIGPIPE, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid = pid_t()
        guard posix_spawn(&pid, path, &actions, &attributes, argv, environ) == 0 else { return -1 }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { return -1 }
        }
        return status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}
