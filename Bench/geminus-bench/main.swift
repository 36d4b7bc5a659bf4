// The checkpoint pipeline on the simulated guest, stage by stage, next to a memcpy of the same
// bytes measured in the same run (the physical limit on this machine). Build in release:
//   swift run -c release geminus-bench [--ram-mib 256] [--pages-per-epoch 2000] [--epochs 200] [--json]
import ArgumentParser
import Foundation
import GeminusCore
import GeminusBench
import GeminusHypervisor
import Histogram

@main
struct PipelineBenchCommand: ParsableCommand {
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

    func measure(_ kind: PageContent) throws -> GeminusBench.PipelineBench.Result {
        try GeminusBench.PipelineBench(ramMiB: ramMib, pagesPerEpoch: pagesPerEpoch, epochs: epochs).measure(kind)
    }
}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
func f2(_ v: Double) -> String { String(format: "%.2f", v) }
func f1(_ v: Double) -> String { String(format: "%.1f", v) }
