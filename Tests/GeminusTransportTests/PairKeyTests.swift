import Foundation
import GeminusCore
@testable import GeminusTransport
import Testing

@Suite final class PairKeyTests {
    let dir = makeTemporaryDirectory()

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    func write(_ text: String, to name: String, mode: mode_t) -> String {
        let path = dir + "/" + name
        _ = FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
        chmod(path, mode)
        return path
    }

    @Test func generateThenLoadRoundTrips() throws {
        let path = dir + "/pair.key"
        try PairKey.generate(path: path)
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.count == 65 && text.hasSuffix("\n"), "64 hex digits and a newline")
        let key = try PairKey.load(path: path)
        #expect(key.bytes.count == 32)
        #expect(PairKey.encodeHex(key.bytes) + "\n" == text)
        #expect(!"\(key)".contains(PairKey.encodeHex(key.bytes)), "the key never appears in descriptions")
    }

    @Test func generateRefusesToOverwrite() throws {
        let path = dir + "/pair.key"
        try PairKey.generate(path: path)
        let before = try String(contentsOfFile: path, encoding: .utf8)
        let error = #expect(throws: GeminusError.self) { try PairKey.generate(path: path) }
        #expect(error?.code == .keyFile)
        #expect(error?.message.contains("already exists") == true)
        #expect(try String(contentsOfFile: path, encoding: .utf8) == before)
    }

    @Test func missingFileNamesThePathAndTheFix() {
        let path = dir + "/absent.key"
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(error?.code == .keyFile)
        #expect(error?.message.contains(path) == true)
        #expect(error?.fix == "create one with `geminus keygen --out \(path)` and copy it to both hosts")
    }

    @Test func readableByOthersIsRefused() {
        let path = write(String(repeating: "ab", count: 32) + "\n", to: "open.key", mode: 0o644)
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(error?.code == .keyFile)
        #expect(error?.message.contains("0644") == true)
        #expect(error?.fix == "chmod 600 \(path)")
    }

    @Test func groupReadableIsRefused() {
        let path = write(String(repeating: "ab", count: 32), to: "group.key", mode: 0o640)
        #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
    }

    @Test func shortKeyIsRefused() {
        let path = write(String(repeating: "ab", count: 16) + "\n", to: "short.key", mode: 0o600)
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(error?.code == .keyFile)
        #expect(error?.message.contains("16 bytes") == true)
    }

    @Test func nonHexIsRefused() {
        let path = write("this is not a key, it is a sentence of some length\n", to: "text.key", mode: 0o600)
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(error?.message.contains("hex") == true)
    }

    @Test func directoryIsRefused() {
        mkdir(dir + "/sub", 0o700)
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: dir + "/sub") }
        #expect(error?.message.contains("not a regular file") == true)
    }

    @Test func toleratesCRLFAndUppercase() throws {
        let path = write(String(repeating: "AB", count: 40) + "\r\n", to: "crlf.key", mode: 0o600)
        let key = try PairKey.load(path: path)
        #expect(key.bytes == [UInt8](repeating: 0xAB, count: 40))
    }

    // L3: a key file of another user, or in a directory others may write, is not this agent's.

    @Test func anotherUsersKeyIsRefused() throws {
        let path = write(String(repeating: "ab", count: 32) + "\n", to: "theirs.key", mode: 0o600)
        let other: uid_t = geteuid() == 65534 ? 65533 : 65534
        guard chown(path, other, gid_t(65534)) == 0 else {
            // Giving a file away needs root (CAP_CHOWN): nothing to check as another user.
            return
        }
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(error?.code == .keyFile)
        #expect(error?.message.contains("belongs to uid \(other)") == true, "\(String(describing: error))")
        #expect(error?.fix?.contains("chown") == true)
    }

    @Test func keyInADirectoryOthersMayWriteIsRefused() throws {
        let shared = dir + "/shared"
        mkdir(shared, 0o700)
        chmod(shared, 0o1777)
        let path = shared + "/pair.key"
        _ = FileManager.default.createFile(atPath: path, contents: Data((String(repeating: "ab", count: 32) + "\n").utf8))
        chmod(path, 0o600)
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(error?.code == .keyFile)
        #expect(error?.message.contains("may be written by other users (mode 01777)") == true, "\(String(describing: error))")
        #expect(error?.fix?.contains("chmod go-w \(shared)") == true)

        chmod(shared, 0o770)
        let groupWritable = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(groupWritable?.message.contains("mode 0770") == true)

        chmod(shared, 0o755)
        #expect(try PairKey.load(path: path).bytes.count == 32, "a directory only its owner writes is fine")
    }

    @Test func keyInADirectoryOfAnotherUserIsRefused() throws {
        let theirs = dir + "/theirs"
        mkdir(theirs, 0o755)
        let path = theirs + "/pair.key"
        _ = FileManager.default.createFile(atPath: path, contents: Data((String(repeating: "ab", count: 32) + "\n").utf8))
        chmod(path, 0o600)
        guard chown(theirs, 65534, 65534) == 0, geteuid() != 65534 else { return }
        let error = #expect(throws: GeminusError.self) { try PairKey.load(path: path) }
        #expect(error?.message.contains("belongs to uid 65534: that user could replace the key") == true, "\(String(describing: error))")
    }
}
