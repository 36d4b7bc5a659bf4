import GeminusCore

/// How an agent finds the pages a guest wrote: the operator's choice, turned into a
/// `DirtyPageFinder` once QEMU's pid and RAM file are known.
public struct DirtyPagePolicy: Sendable {
    public enum Method: String, Sendable, CaseIterable {
        /// Write tracking when this kernel and this QEMU allow it, else compare (said once).
        case auto
        /// Compare every page with a shadow copy: any kernel, any QEMU; O(guest RAM) a pause.
        case compare
        /// Write tracking or nothing: a guest that cannot be tracked is refused.
        case tracking
    }

    public var method: Method
    /// Check every tracked epoch against a full comparison (`--verify-tracking`).
    public var verify: Bool
    /// How written pages are protected again after each scan (`--tracking-reprotect`).
    public var reprotect: WriteTrackingReprotect
    /// Track even with a device on QEMU's command line whose writes tracking cannot see
    /// (tests of the mechanism only).
    public var allowUntrackableDevices = false
    public var onMiss: (@Sendable (TrackingVerification, String) -> Void)?

    public init(method: Method = .compare, verify: Bool = false, reprotect: WriteTrackingReprotect = .inScan,
                onMiss: (@Sendable (TrackingVerification, String) -> Void)? = nil) {
        self.method = method
        self.verify = verify
        self.reprotect = reprotect
        self.onMiss = onMiss
    }

    public static let compare = DirtyPagePolicy()

    /// The finder for the QEMU with `qemuPID` whose guest RAM is `ramFilePath`. With `.auto`,
    /// a guest that cannot be tracked gets the compare method and `fallback` hears why; with
    /// `.tracking` that is an error. `qemuPID` nil (libvirt would not say) counts as untrackable.
    public func makeFinder(qemuPID: Int32?, ramFilePath: String,
                           fallback: (GeminusError) -> Void) throws(GeminusError) -> any DirtyPageFinder {
        guard method != .compare else { return ShadowCompareFinder() }
        do throws(GeminusError) {
            guard let qemuPID else {
                throw GeminusError(.hypervisor, "the QEMU process of this guest is not known, so its writes cannot be tracked",
                                   fix: "run the agent as root on the guest's host (it reads libvirt's pid file)")
            }
            if let e = WriteTrackingFinder.probe() { throw e }
            let tracker = try WriteTrackingFinder(qemuPID: qemuPID, ramFilePath: ramFilePath, reprotect: reprotect,
                                                  allowUntrackableDevices: allowUntrackableDevices)
            return verify ? VerifyingFinder(tracking: tracker, onMiss: onMiss) : tracker
        } catch {
            if method == .tracking { throw error }
            fallback(error)
            return ShadowCompareFinder()
        }
    }

    /// The finder for a guest a standby has just resumed. The guest already runs here, so a
    /// guest that cannot be tracked is never refused now (that would leave it running without
    /// its agent): it gets the compare method and `fallback` hears why, whatever `method` says.
    public func makeFinderForResumedGuest(qemuPID: Int32?, ramFilePath: String,
                                          fallback: (GeminusError) -> Void) -> any DirtyPageFinder {
        do throws(GeminusError) {
            return try makeFinder(qemuPID: qemuPID, ramFilePath: ramFilePath, fallback: fallback)
        } catch {
            fallback(error)
            return ShadowCompareFinder()
        }
    }
}
