import Foundation

/// Runs the `geminus` executable built next to this test bundle, as an operator would.
struct GeminusBinary {
    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    static var url: URL {
        let bundle = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        return bundle.deletingLastPathComponent().appendingPathComponent("geminus")
    }

    /// Runs to completion, killing it after `timeoutSeconds` (a hung agent fails the test
    /// instead of hanging CI).
    static func run(_ arguments: [String], timeoutSeconds: Double = 60) throws -> Result {
        let p = Process()
        p.executableURL = url
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let outData = DataBox(), errData = DataBox()
        let g = DispatchGroup()
        for (pipe, box) in [(out, outData), (err, errData)] {
            g.enter()
            Thread { box.data = pipe.fileHandleForReading.readDataToEndOfFile(); g.leave() }.start()
        }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while p.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        g.wait()
        return Result(status: p.terminationStatus, stdout: String(decoding: outData.data, as: UTF8.self),
                      stderr: String(decoding: errData.data, as: UTF8.self))
    }
}

final class DataBox: @unchecked Sendable { var data = Data() }

/// A private directory per test, removed afterwards.
struct Scratch {
    let url: URL
    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("geminus-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    func path(_ name: String) -> String { url.appendingPathComponent(name).path }
    func remove() { try? FileManager.default.removeItem(at: url) }
}
