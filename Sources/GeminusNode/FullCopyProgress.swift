import Foundation
import GeminusCore

/// Progress of sending a full checkpoint: at most one report per interval, with the rate and
/// the time left at that rate. Pure arithmetic: the caller supplies the clock.
public struct FullCopyProgress: Sendable {
    public let epoch: Epoch
    public let totalPages: Int
    public let startNanos: UInt64
    public let intervalNanos: UInt64
    private var nextNanos: UInt64

    public init(epoch: Epoch, totalPages: Int, startNanos: UInt64, intervalNanos: UInt64) {
        self.epoch = epoch
        self.totalPages = totalPages
        self.startNanos = startNanos
        self.intervalNanos = intervalNanos
        nextNanos = startNanos + intervalNanos
    }

    public mutating func report(pagesDone: Int, nowNanos: UInt64) -> (text: String, fields: [String: JSONValue])? {
        guard nowNanos >= nextNanos, totalPages > 0, nowNanos > startNanos else { return nil }
        nextNanos = nowNanos + intervalNanos
        let seconds = Double(nowNanos - startNanos) / 1e9
        let pagesPerSecond = Double(pagesDone) / seconds
        let etaSeconds = pagesPerSecond > 0 ? Double(totalPages - pagesDone) / pagesPerSecond : .infinity
        let mib = { (pages: Int) in (pages * GuestPage.size) >> 20 }
        let percent = 100 * pagesDone / totalPages
        let eta = etaSeconds.isFinite ? String(format: "%.1f s", etaSeconds) : "unknown"
        let text = "full checkpoint \(epoch): \(mib(pagesDone)) of \(mib(totalPages)) MiB (\(percent) %), "
            + String(format: "%.0f MiB/s", pagesPerSecond * Double(GuestPage.size) / 1_048_576) + ", about \(eta) left"
        return (text, ["epoch": .int(epoch.rawValue), "pagesDone": .int(pagesDone), "pagesTotal": .int(totalPages), "percent": .int(percent),
                       "etaSeconds": .double(etaSeconds.isFinite ? etaSeconds : -1)])
    }
}
