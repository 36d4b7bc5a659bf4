import Foundation

/// Runs the `geminus` executable built next to this test bundle, as an operator would.
struct GeminusBinary {
    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
        var elapsedSeconds: Double = 0

        /// The last lines of standard error, for a failure message.
        var stderrTail: String {
            stderr.split(separator: "\n").filter { !$0.contains("Killed") }.suffix(20).joined(separator: "\n")
        }
    }

    static var url: URL {
        let bundle = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        return bundle.deletingLastPathComponent().appendingPathComponent("geminus")
    }

    /// Runs to completion, killing it after `timeoutSeconds` (a hung agent fails the test
    /// instead of hanging CI).
    static func run(_ arguments: [String], timeoutSeconds: Double = 60) throws -> Result {
        try run(executable: url, arguments, timeoutSeconds: timeoutSeconds)
    }

    /// The same for another program (the repository's test scripts).
    static func run(executable: URL, _ arguments: [String], timeoutSeconds: Double) throws -> Result {
        let started = Date()
        let p = Process()
        p.executableURL = executable
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
                      stderr: String(decoding: errData.data, as: UTF8.self), elapsedSeconds: Date().timeIntervalSince(started))
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
