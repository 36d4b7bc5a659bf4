/// Which guest `geminus demo` runs.
public enum DemoGuest: String, Sendable {
    /// The Linux test guest (Tools/guest-linux) with a client's transactions crossing the
    /// failover: `LinuxDemo`. The default: it shows what a user's VM goes through, in about a
    /// minute.
    case linux
    /// The tiny bare-metal test guest (Tools/guest-tiny) or the simulated VM: `DemoRun`. Needs
    /// no root when it falls back to the simulated VM, and checks the resumed checkpoint exactly.
    case tiny

    /// The guest the command line asks for: `--linux`, `--tiny`, or the tiny guest when an option
    /// only its demo has is given (`tinyOptions`: --simulated, --qemu, --libvirt, --kernel);
    /// Linux when nothing says otherwise. Throws when --linux is given with a tiny-only option.
    public static func choose(linux: Bool, tiny: Bool, tinyOptions: [String]) throws -> DemoGuest {
        if linux && tiny { throw DemoFailure(description: "choose one of --linux and --tiny") }
        if linux, let option = tinyOptions.first {
            throw DemoFailure(description: "\(option) is an option of the tiny-guest demo; drop it, or use --tiny instead of --linux")
        }
        return tiny || !tinyOptions.isEmpty ? .tiny : .linux
    }
}
