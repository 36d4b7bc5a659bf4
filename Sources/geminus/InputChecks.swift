import ArgumentParser
import GeminusCore

/// Command-line values checked in `validate()`, before anything starts: a value that would
/// trap later (a negative duration converted to UInt64, a zero-sized buffer) or do harm (a VM
/// name with `/` or `,`) is a usage error naming the option and the accepted range.
enum InputCheck {
    /// A day: longer than any silence or hold an operator means, and small enough that the
    /// conversion to nanoseconds cannot overflow.
    static let maxMillis = 86_400_000
    /// RAM in MiB up to GuestPage.maxCount pages (16 TiB), the most a hello may announce.
    static let maxRAMMiB = Int(GuestPage.maxCount >> (20 - GuestPage.shift))

    /// A VM or libvirt domain name (ResourceName's rule, one for every command).
    static func name(_ value: String, _ option: String) throws {
        do { try ResourceName.validate(value, as: option) } catch { throw ValidationError(error.description) }
    }

    static func millis(_ value: Int, _ option: String, min: Int = 1, max: Int = maxMillis) throws {
        guard value >= min && value <= max else {
            throw ValidationError("\(option) \(value) is outside \(min)...\(max) milliseconds")
        }
    }

    static func range(_ value: Int, _ option: String, _ accepted: ClosedRange<Int>, unit: String) throws {
        guard accepted.contains(value) else {
            throw ValidationError("\(option) \(value) is outside \(accepted.lowerBound)...\(accepted.upperBound) \(unit)")
        }
    }
}
