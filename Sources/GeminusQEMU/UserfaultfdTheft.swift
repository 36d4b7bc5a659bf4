import CGeminusSupport
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Taking QEMU's userfaultfd (created in QEMU by the preload library) with pidfd_getfd.
extension WriteTrackingFinder {
    /// The descriptor numbers of `pid` that are userfaultfds.
    public static func userfaultfdNumbers(of pid: Int32) throws(GeminusError) -> [Int32] {
        let dir = "/proc/\(pid)/fd"
        let names: [String]
        do { names = try FileManager.default.contentsOfDirectory(atPath: dir) } catch {
            throw GeminusError(.hypervisor, "cannot list \(dir): \(error.localizedDescription)",
                               fix: "check that QEMU (pid \(pid)) runs and that the agent runs as root or as QEMU's user")
        }
        var found: [Int32] = []
        var link = [CChar](repeating: 0, count: 256)
        for name in names {
            guard let n = Int32(name) else { continue }
            let len = readlink("\(dir)/\(name)", &link, link.count - 1)
            guard len > 0 else { continue }
            let target = link.withUnsafeBufferPointer { String(decoding: UnsafeRawBufferPointer($0).prefix(len), as: UTF8.self) }
            if target == "anon_inode:[userfaultfd]" { found.append(n) }
        }
        return found.sorted()
    }

    static func takeUserfaultfd(of pid: Int32) throws(GeminusError) -> Int32 {
        let numbers = try userfaultfdNumbers(of: pid)
        guard let number = numbers.first else {
            throw GeminusError(.hypervisor,
                               "QEMU (pid \(pid)) has no userfaultfd: QEMU was not started with the preload library \(WriteTrackingPreload.fileName), or the library could not create one (its reason is on QEMU's stderr)",
                               fix: "start QEMU with LD_PRELOAD=<path of \(WriteTrackingPreload.fileName)> (libvirt: <qemu:env name='LD_PRELOAD' value='…'/> in the domain's qemu:commandline); \(WriteTrackingPreload.buildHint); until then the compare method is used")
        }
        // Several would mean something else in QEMU uses userfaultfd too (postcopy): the
        // preload's is created first, before QEMU's main, so it has the lowest number.
        let pidfd = geminus_pidfd_open(pid)
        guard pidfd >= 0 else {
            throw GeminusError(.hypervisor, "pidfd_open(\(pid)) failed: \(errnoText(-pidfd))",
                               fix: -pidfd == ENOSYS ? "write tracking needs Linux 6.7+" : "check that QEMU (pid \(pid)) still runs")
        }
        defer { close(pidfd) }
        let fd = geminus_pidfd_getfd(pidfd, number)
        guard fd >= 0 else {
            throw GeminusError(.hypervisor, "cannot take QEMU's userfaultfd (pid \(pid), fd \(number)) with pidfd_getfd: \(errnoText(-fd))",
                               fix: -fd == EPERM ? "run the agent as root (pidfd_getfd needs ptrace access to QEMU)" : "write tracking needs Linux 5.6+ for pidfd_getfd and 6.7+ overall")
        }
        return fd
    }
}
