// The checkpoint pipeline on the simulated guest, stage by stage, next to a memcpy of the same
// bytes measured in the same run (the physical limit on this machine). Build in release:
//   swift run -c release geminus-bench [--ram-mib 256] [--pages-per-epoch 2000] [--epochs 200] [--json]
import ArgumentParser
import Foundation
import GeminusCore
import GeminusHypervisor
import Histogram

@main
struct PipelineBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "geminus-bench",
        abstract: "Benchmark capture, encode and decode of checkpoints on the simulated guest.")

    @Option(help: "Guest RAM in MiB.") var ramMib = 256
    @Option(help: "Pages the guest writes between checkpoints.") var pagesPerEpoch = 2000
    @Option(help: "Checkpoints per workload.") var epochs = 200
    @Option(help: "Workloads to run (comma-separated).") var workloads = PageContent.allCases.map(\.rawValue).joined(separator: ",")
    @Flag(help: "Print JSON instead of a table.") var json = false

    func run() throws {
        let kinds = try workloads.split(separator: ",").map { name -> PageContent in
            guard let k = PageContent(rawValue: String(name)) else { throw ValidationError("unknown workload '\(name)'") }
            return k
        }
        var results: [[String: Any]] = []
        if !json {
            print("geminus-bench: \(ramMib) MiB guest, \(pagesPerEpoch) pages/epoch, \(epochs) epochs per workload, CRC32C \(CRC32C.isHardwareAccelerated ? "hardware" : "software")")
            print("baseline: a plain memcpy of each epoch's captured pages, timed right after the capture (the physical limit)")
            print("")
            print(pad("workload", 11) + pad("memcpy", 8) + pad("capture", 15) + pad("encode", 15) + pad("decode", 15)
                  + pad("enc/memcpy", 11) + pad("ratio", 9) + pad("pause us p50/p99/max", 21) + pad("commit us p50/p99", 19) + "wire MB/epoch")
            print(pad("", 11) + pad("GB/s", 8) + pad("GB/s Mpage/s", 15) + pad("GB/s Mpage/s", 15) + pad("GB/s Mpage/s", 15))
        }
        for kind in kinds {
            FileHandle.standardError.write("running \(kind.rawValue)...\n".data(using: .utf8)!)
            let r = try measure(kind)
            let memcpyGBps = r.memcpyGBps
            var row = r.json
            row["workload"] = kind.rawValue
            row["encodeVsMemcpy"] = r.encodeGBps / memcpyGBps
            row["captureVsMemcpy"] = r.captureGBps / memcpyGBps
            results.append(row)
            if !json {
                func both(_ gbps: Double) -> String { pad(f2(gbps), 6) + f2(gbps * 1e9 / 4096 / 1e6) }
                print(pad(kind.rawValue, 11) + pad(f2(memcpyGBps), 8) + pad(both(r.captureGBps), 15) + pad(both(r.encodeGBps), 15)
                      + pad(both(r.decodeGBps), 15) + pad(f2(r.encodeGBps / memcpyGBps), 11) + pad(f1(r.ratio) + ":1", 9)
                      + pad("\(r.pause.valueAtPercentile(50))/\(r.pause.valueAtPercentile(99))/\(r.pause.max)", 21)
                      + pad("\(r.commit.valueAtPercentile(50))/\(r.commit.valueAtPercentile(99))", 19)
                      + f2(Double(r.wireBytes) / Double(epochs) / 1e6))
            }
        }
        if json {
            let doc: [String: Any] = ["ramMiB": ramMib, "pagesPerEpoch": pagesPerEpoch, "epochs": epochs,
                                      "crc32cHardware": CRC32C.isHardwareAccelerated, "results": results]
            let data = try JSONSerialization.data(withJSONObject: doc, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        }
    }

    struct Result {
        var memcpyGBps = 0.0, captureGBps = 0.0, encodeGBps = 0.0, decodeGBps = 0.0, ratio = 0.0
        var pagesPerSecondEncode = 0.0
        var wireBytes = 0
        var pause = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        var commit = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        var json: [String: Any] {
            ["memcpyGBps": memcpyGBps, "captureGBps": captureGBps, "encodeGBps": encodeGBps, "decodeGBps": decodeGBps, "compressionRatio": ratio,
             "encodePagesPerSecond": pagesPerSecondEncode, "wireBytes": wireBytes,
             "pauseMicros": ["p50": pause.valueAtPercentile(50), "p90": pause.valueAtPercentile(90), "p99": pause.valueAtPercentile(99), "max": pause.max],
             "commitMicros": ["p50": commit.valueAtPercentile(50), "p90": commit.valueAtPercentile(90), "p99": commit.valueAtPercentile(99), "max": commit.max]]
        }
    }

    func measure(_ kind: PageContent) throws -> Result {
        let workload = SimulatedWorkload(ramMiB: ramMib, dirtyPagesPerSecond: 100_000, hotFraction: 0.25, content: kind, outputsPerSecond: 0, seed: 11)
        let guest = try SimulatedGuest(workload: workload, memory: PageMemory(pageCount: workload.pageCount))
        let encoder = try CheckpointEncoder(pageCount: workload.pageCount)
        let replica = Replica(memory: try PageMemory(pageCount: workload.pageCount))
        let buffer = CheckpointBuffer(limitPages: workload.pageCount)
        // The full first checkpoint is not what the steady state costs; it is done untimed.
        try guest.capture(full: true, into: buffer)
        var epoch = Epoch(1)
        try deliver(encode(encoder, buffer, epoch, base: .none).frames, to: replica)
        var r = Result()
        let copyTarget = UnsafeMutableRawPointer.allocate(byteCount: workload.pageCount * GuestPage.size, alignment: GuestPage.size)
        defer { copyTarget.deallocate() }
        var memcpyNanos: UInt64 = 0
        var captureNanos: UInt64 = 0, encodeNanos: UInt64 = 0, decodeNanos: UInt64 = 0
        var inputBytes = 0, pages = 0
        for _ in 0..<epochs {
            // Between checkpoints the guest writes; that is the guest's time, not ours.
            for _ in 0..<pagesPerEpoch { guest.step() }
            let t0 = Monotonic.nanos()
            try guest.capture(full: false, into: buffer)
            let t1 = Monotonic.nanos()
            // Baseline: the same pages, same cache state, copied with nothing but memcpy.
            let m0 = Monotonic.nanos()
            for (i, p) in buffer.pageIndices.enumerated() {
                (copyTarget + i * GuestPage.size).copyMemory(from: guest.memory.page(p), byteCount: GuestPage.size)
            }
            memcpyNanos += Monotonic.nanos() - m0
            let base = epoch
            epoch = epoch.next
            let (frames, stats) = encode(encoder, buffer, epoch, base: base)
            let t2 = Monotonic.nanos()
            try deliver(frames, to: replica)
            let t3 = Monotonic.nanos()
            precondition(replica.committedEpoch == epoch, "benchmark epoch was not committed")
            captureNanos += t1 - t0
            encodeNanos += t2 - t1
            decodeNanos += t3 - t2
            _ = r.pause.record((t1 - t0) / 1000)
            _ = r.commit.record((t3 - t0) / 1000)
            inputBytes += stats.inputBytes
            r.wireBytes += stats.wireBytes
            pages += stats.pages
        }
        precondition(replica.memory.contentsEqual(guest.memory), "replica diverged from the guest")
        r.memcpyGBps = Double(pages * GuestPage.size) / Double(memcpyNanos)
        r.captureGBps = Double(inputBytes) / Double(captureNanos)
        r.encodeGBps = Double(inputBytes) / Double(encodeNanos)
        r.decodeGBps = Double(inputBytes) / Double(decodeNanos)
        r.ratio = Double(inputBytes) / Double(r.wireBytes)
        r.pagesPerSecondEncode = Double(pages) / (Double(encodeNanos) / 1e9)
        return r
    }

    func encode(_ e: CheckpointEncoder, _ b: CheckpointBuffer, _ epoch: Epoch, base: Epoch) -> (frames: [[UInt8]], stats: EncodeStats) {
        var frames: [[UInt8]] = []
        let s = e.encode(b, epoch: epoch, generation: Generation(1), baseEpoch: base) { frames.append($0) }
        return (frames, s)
    }

    func deliver(_ frames: [[UInt8]], to replica: Replica) throws {
        var d = FrameDecoder()
        for f in frames {
            d.feed(f)
            while let frame = try d.next() {
                if case .rejected(_, let reason, let detail) = replica.accept(frame) {
                    throw ValidationError("replica rejected a benchmark epoch: \(reason) \(detail)")
                }
            }
        }
    }

}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
func f2(_ v: Double) -> String { String(format: "%.2f", v) }
func f1(_ v: Double) -> String { String(format: "%.1f", v) }
