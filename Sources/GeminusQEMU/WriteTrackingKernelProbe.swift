import CGeminusSupport
import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// Whether this kernel can track writes at all (asked before anything touches QEMU).
extension WriteTrackingFinder {
    private static let probeResult: Int32 = geminus_write_tracking_probe()

    /// Whether this kernel has asynchronous write-protect and PAGEMAP_SCAN (Linux 6.7+), tried
    /// once per process on a scratch mapping. Nil when it works, else the reason.
    public static func probe() -> GeminusError? {
        let r = probeResult
        if r == 1 { return nil }
        let why: String
        switch -r {
        case ENOSYS: why = "this kernel has no userfaultfd (CONFIG_USERFAULTFD off)"
        case EPERM: why = "userfaultfd is not permitted here (seccomp, or vm.unprivileged_userfaultfd=0 on a kernel before 5.11)"
        case EINVAL, ENOTTY:
            why = "this kernel lacks asynchronous userfaultfd write-protect or PAGEMAP_SCAN (\(errnoText(-r)))"
        default: why = "the write-tracking self-test failed: \(errnoText(-r))"
        }
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return GeminusError(.hypervisor, "write tracking is unavailable on Linux \(release): \(why)",
                            fix: "write tracking needs Linux 6.7+ with CONFIG_USERFAULTFD and CONFIG_PTE_MARKER_UFFD_WP; use the compare method (ShadowCompareFinder) on this host")
    }

    public static func checkKernelSupport() throws(GeminusError) {
        if let e = probe() { throw e }
    }
}
