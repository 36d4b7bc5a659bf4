import Foundation
import Testing
import GeminusAgent
import GeminusCore

/// Which generation an agent starts at, from the file its last run left.
@Suite struct GenerationFileTests {
    func file(_ content: String?) throws -> (GenerationFile, String) {
        let dir = NSTemporaryDirectory() + "geminus-generation-\(getpid())-\(UInt64.random(in: 0 ... .max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        let f = GenerationFile(path: dir + "/vm.generation")
        if let content { try content.write(toFile: f.path, atomically: false, encoding: .utf8) }
        return (f, dir)
    }

    /// A restarted primary takes the next generation, so it never runs under the stop notice or
    /// the unprotect record of the generation its earlier run left in the witness.
    @Test func aPrimaryStartsAtTheNextGenerationASecondaryAtTheFilesOwn() throws {
        let (f, dir) = try file("4\n")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try f.startGeneration(for: .primary) == Generation(5))
        #expect(try f.startGeneration(for: .secondary) == Generation(4))
    }

    @Test func withoutAFileBothStartAtOne() throws {
        let (f, dir) = try file(nil)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try f.startGeneration(for: .primary) == Generation(1))
        #expect(try f.startGeneration(for: .secondary) == Generation(1))
    }

    /// The last number there is: an error with the way out, not an overflow trap.
    @Test func theLastGenerationIsAnErrorNotATrap() throws {
        let (f, dir) = try file("\(UInt64.max)\n")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(throws: GeminusError.self) { try f.startGeneration(for: .primary) }
        #expect(try f.startGeneration(for: .secondary) == Generation(UInt64.max))
    }
}
