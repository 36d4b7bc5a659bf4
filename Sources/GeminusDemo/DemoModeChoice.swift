import Foundation
import GeminusTestSupport

extension DemoMode {
    /// The mode asked for (`simulated`, `qemu`, `libvirt`), or by default libvirt when it can be
    /// had (libvirtd answering at `uri`, started if need be; the test guest `kernel` or one built
    /// from the source tree), else simulated and why (`fallback`). With `libvirt` asked for,
    /// the reason it cannot be had is thrown instead.
    public static func choose(simulated: Bool, qemu: Bool, libvirt: Bool, kernel: String?, uri: String,
                              say: (String) -> Void) throws -> (DemoMode, kernel: String?, fallback: String?) {
        if simulated { return (.simulated, nil, nil) }
        if qemu { return (.qemu, kernel, nil) }
        var why = LibvirtSetup.ensure(uri: uri, say: say)
        var guest = kernel
        if why == nil && guest == nil {
            switch TestGuestLocator.tinyGuest(say: say) {
            case .success(let path): guest = path
            case .failure(let reason): why = reason.description
            }
        }
        if let why {
            if libvirt { throw DemoFailure(description: "cannot run the libvirt demo: \(why)") }
            say("NOTE: replicating the SIMULATED VM instead of a real one: \(why)")
            return (.simulated, nil, why)
        }
        return (.libvirt, guest, nil)
    }
}
