import Foundation
import GeminusCore
#if canImport(Glibc)
import Glibc
#endif

/// The write-tracking policy on devices: which ones change guest RAM behind the tracked mapping.
extension WriteTrackingFinder {
    /// Device models that change guest RAM in ways the tracked mapping never sees, matched in the
    /// arguments of -device, -netdev, -object and -chardev (plain or JSON syntax).
    public static let untrackableDeviceMarkers: [(marker: String, why: String)] = [
        ("virtio-balloon", "balloon inflation and free-page reporting discard guest pages by hole punching, which is not reported"),
        ("virtio-mem", "virtio-mem unplugs guest memory by discarding it"),
        ("vhost-user", "a vhost-user backend writes guest RAM through its own mapping"),
        ("vfio", "a VFIO device writes guest RAM by DMA"),
    ]

    /// The arguments of `argv` (QEMU's command line) naming a device in `untrackableDeviceMarkers`.
    public static func untrackableDevices(inArguments argv: [String]) -> [(argument: String, why: String)] {
        var out: [(String, String)] = []
        for (i, a) in argv.enumerated() where i > 0 && ["-device", "-netdev", "-object", "-chardev"].contains(argv[i - 1]) {
            if let m = WriteTrackingFinder.untrackableDeviceMarkers.first(where: { a.contains($0.marker) }) { out.append((a, m.why)) }
        }
        return out
    }

    /// QEMU's argv, from /proc/PID/cmdline.
    static func commandLine(of pid: Int32) throws(GeminusError) -> [String] {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), !data.isEmpty else {
            throw GeminusError(.hypervisor, "cannot read /proc/\(pid)/cmdline", fix: "check that QEMU (pid \(pid)) still runs and the agent runs as root")
        }
        return data.split(separator: 0, omittingEmptySubsequences: true).map { String(decoding: $0, as: UTF8.self) }
    }
}
