import Foundation
import GeminusCore
import GeminusReplication

/// What the CA agents and the witness publish through the cluster seam (CPG, agreed order; one
/// latest state per node, republished after every membership change so newcomers get it).
/// JSON, small: a few hundred bytes per VM.
enum WitnessMessage: Equatable {
    /// A pair agent: "generation G of VM ran unprotected after epoch E" (nil: nothing to say yet),
    /// and "generation G of VM stopped its guest for good" (a self-fenced primary; nil: not).
    case agent(vm: String, record: WitnessRecord?, stopped: Generation?)
    /// The witness: every record it holds, and the newest stopped generation per VM.
    case witness(records: [String: WitnessRecord], stopped: [String: Generation])

    static let maxRecords = 4096

    /// The JSON on the wire and in the witness's state file (keys sorted, absent values left out).
    private struct Wire: Codable {
        struct Record: Codable {
            var generation: UInt64
            var after: UInt64
        }
        var kind: String
        var vm: String?
        var record: Record?
        var stopped: UInt64?
        var records: [String: Record]?
        /// The witness's stopped generations (files written before stop notices have none).
        var stoppedByVM: [String: UInt64]?

        enum CodingKeys: String, CodingKey {
            case kind, vm, record, records
            // One key, two shapes: an agent's generation, or the witness's map of them.
            case stopped
        }

        init(kind: String) { self.kind = kind }

        var isPlausible: Bool {
            let records = (record.map { [$0] } ?? []) + (self.records.map { Array($0.values) } ?? [])
            let generations = records.map(\.generation) + (stopped.map { [$0] } ?? []) + (stoppedByVM.map { Array($0.values) } ?? [])
            return generations.allSatisfy { Generation($0).isAcceptable } && records.allSatisfy { Epoch($0.after).isAcceptable }
        }

        init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            kind = try c.decode(String.self, forKey: .kind)
            vm = try c.decodeIfPresent(String.self, forKey: .vm)
            record = try c.decodeIfPresent(Record.self, forKey: .record)
            records = try c.decodeIfPresent([String: Record].self, forKey: .records)
            if kind == WitnessMessage.witnessKind {
                stoppedByVM = try c.decodeIfPresent([String: UInt64].self, forKey: .stopped)
            } else {
                stopped = try c.decodeIfPresent(UInt64.self, forKey: .stopped)
            }
        }

        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(kind, forKey: .kind)
            try c.encodeIfPresent(vm, forKey: .vm)
            try c.encodeIfPresent(record, forKey: .record)
            try c.encodeIfPresent(records, forKey: .records)
            if let stoppedByVM { try c.encode(stoppedByVM, forKey: .stopped) } else { try c.encodeIfPresent(stopped, forKey: .stopped) }
        }
    }

    static let agentKind = "geminus-ca-agent"
    static let witnessKind = "geminus-ca-witness"

    func encoded() -> [UInt8] {
        func r(_ w: WitnessRecord) -> Wire.Record { Wire.Record(generation: w.generation.rawValue, after: w.unprotectedAfter.rawValue) }
        var wire: Wire
        switch self {
        case .agent(let vm, let record, let stopped):
            wire = Wire(kind: Self.agentKind)
            wire.vm = vm
            wire.record = record.map(r)
            wire.stopped = stopped?.rawValue
        case .witness(let records, let stopped):
            wire = Wire(kind: Self.witnessKind)
            wire.records = records.mapValues(r)
            wire.stoppedByVM = stopped.mapValues(\.rawValue)
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try! encoder.encode(wire))
    }

    /// nil for anything malformed, including generations and epochs no pair reaches (past
    /// their `maxAccepted`): a machine may count on from any record it is shown.
    init?(decoding bytes: [UInt8]) {
        guard let wire = try? JSONDecoder().decode(Wire.self, from: Data(bytes)), wire.isPlausible else { return nil }
        func r(_ w: Wire.Record) -> WitnessRecord { WitnessRecord(generation: Generation(w.generation), unprotectedAfter: Epoch(w.after)) }
        switch wire.kind {
        case Self.agentKind:
            guard let vm = wire.vm else { return nil }
            self = .agent(vm: vm, record: wire.record.map(r), stopped: wire.stopped.map { Generation($0) })
        case Self.witnessKind:
            let records = wire.records ?? [:]
            let stopped = wire.stoppedByVM ?? [:]
            guard wire.records != nil, records.count <= Self.maxRecords, stopped.count <= Self.maxRecords else { return nil }
            self = .witness(records: records.mapValues(r), stopped: stopped.mapValues { Generation($0) })
        default:
            return nil
        }
    }
}
