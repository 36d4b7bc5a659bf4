#if canImport(Glibc)
import Glibc
#endif
import GeminusCore

/// The secret both agents of a pair hold. Whoever has it can feed the secondary checkpoints
/// (and so decide what VM it would resume), so the file is refused unless only its owner can
/// read it.
public struct PairKey: Sendable, CustomStringConvertible {
    public static let minimumBytes = 32
    public static let generatedBytes = 32
    /// A hex key of a few hundred bytes is plenty; anything bigger is the wrong file.
    static let maximumFileBytes = 4096

    let bytes: [UInt8]
    /// Where the key came from, for messages; never the key itself.
    public let path: String

    /// A key held in memory (tests, embedding). At least `minimumBytes` long.
    public init(bytes: [UInt8], path: String = "(in memory)") throws(GeminusError) {
        guard bytes.count >= Self.minimumBytes else {
            throw GeminusError(.keyFile, "pair key \(path) is \(bytes.count) bytes; at least \(Self.minimumBytes) are required",
                               fix: Self.createFix(path))
        }
        self.bytes = bytes
        self.path = path
    }

    public var description: String { "PairKey(\(path))" }

    static func createFix(_ path: String) -> String {
        "create one with `geminus keygen --out \(path)` and copy it to both hosts"
    }

    public static func load(path: String) throws(GeminusError) -> PairKey {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
        guard fd >= 0 else {
            let e = errno
            switch e {
            case ENOENT:
                throw GeminusError(.keyFile, "pair key file \(path) does not exist", fix: createFix(path))
            case EACCES:
                throw GeminusError(.keyFile, "cannot read pair key file \(path): permission denied",
                                   fix: "run the agent as the user that owns \(path)")
            default:
                throw GeminusError(.keyFile, "cannot open pair key file \(path): \(Socket.describe(errno: e))")
            }
        }
        defer { close(fd) }
        // fstat on the open descriptor, not stat on the path: the checked file is the read file.
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            throw GeminusError(.keyFile, "cannot stat pair key file \(path): \(Socket.describe(errno: errno))")
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw GeminusError(.keyFile, "pair key \(path) is not a regular file", fix: createFix(path))
        }
        let loose = st.st_mode & 0o077
        guard loose == 0 else {
            let mode = String(st.st_mode & 0o777, radix: 8)
            throw GeminusError(.keyFile, "pair key file \(path) is accessible by other users (mode 0\(mode))",
                               fix: "chmod 600 \(path)")
        }
        // Another user's key file, or one in a directory others may write (they could replace
        // it between two starts), is a key this agent cannot vouch for (review L3).
        guard st.st_uid == geteuid() || st.st_uid == 0 else {
            throw GeminusError(.keyFile, "pair key file \(path) belongs to uid \(st.st_uid), not to this agent's user (uid \(geteuid())) or root",
                               fix: "chown \(geteuid()) \(path), or run the agent as the key's owner")
        }
        try checkDirectory(of: path)
        guard Int(st.st_size) <= maximumFileBytes else {
            throw GeminusError(.keyFile, "pair key file \(path) is \(st.st_size) bytes, not a hex-encoded key",
                               fix: createFix(path))
        }
        var text = [UInt8](repeating: 0, count: maximumFileBytes + 1)
        var length = 0
        while length < text.count {
            let n = text.withUnsafeMutableBytes { read(fd, $0.baseAddress! + length, $0.count - length) }
            if n == 0 { break }
            if n < 0 {
                if errno == EINTR { continue }
                throw GeminusError(.keyFile, "cannot read pair key file \(path): \(Socket.describe(errno: errno))")
            }
            length += n
        }
        var hex = text.prefix(length)
        while let last = hex.last, last == UInt8(ascii: "\n") || last == UInt8(ascii: "\r") || last == UInt8(ascii: " ") {
            hex.removeLast()
        }
        guard let key = decodeHex(hex) else {
            throw GeminusError(.keyFile, "pair key file \(path) does not hold a hex-encoded key", fix: createFix(path))
        }
        guard key.count >= minimumBytes else {
            throw GeminusError(.keyFile, "pair key in \(path) is \(key.count) bytes; at least \(minimumBytes) are required",
                               fix: createFix(path))
        }
        return PairKey(unchecked: key, path: path)
    }

    /// The key's directory must be this user's or root's, and not writable by group or others.
    static func checkDirectory(of path: String) throws(GeminusError) {
        let slash = path.lastIndex(of: "/")
        let dir = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        var st = stat()
        guard stat(dir, &st) == 0 else {
            throw GeminusError(.keyFile, "cannot stat the directory \(dir) of pair key file \(path): \(Socket.describe(errno: errno))")
        }
        guard st.st_uid == geteuid() || st.st_uid == 0 else {
            throw GeminusError(.keyFile, "the directory \(dir) of pair key file \(path) belongs to uid \(st.st_uid): that user could replace the key",
                               fix: "keep the key in a directory of root or of the agent's user (e.g. /etc/geminus, mode 0700)")
        }
        guard st.st_mode & 0o022 == 0 else {
            throw GeminusError(.keyFile, "the directory \(dir) of pair key file \(path) may be written by other users (mode 0\(String(st.st_mode & 0o7777, radix: 8))): they could replace the key",
                               fix: "chmod go-w \(dir), or keep the key in a directory only its owner writes (e.g. /etc/geminus, mode 0700)")
        }
    }

    private init(unchecked bytes: [UInt8], path: String) {
        self.bytes = bytes
        self.path = path
    }

    /// Writes a new random key. The file is created with O_EXCL so that an existing key (and
    /// with it the pairing of two hosts) is never silently replaced, and with mode 0600 from
    /// the first instant, so no other user can open it between creation and a chmod.
    public static func generate(path: String) throws(GeminusError) {
        let key = try Crypto.randomBytes(generatedBytes)
        let text = Array((encodeHex(key) + "\n").utf8)
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            let e = errno
            if e == EEXIST {
                throw GeminusError(.keyFile, "\(path) already exists; refusing to overwrite a pair key",
                                   fix: "keep it, or delete it first and copy the new key to both hosts")
            }
            throw GeminusError(.keyFile, "cannot create pair key file \(path): \(Socket.describe(errno: e))")
        }
        var failure = writeFully(fd, text)
        if failure == 0 && fsync(fd) != 0 { failure = errno }
        close(fd)
        if failure != 0 {
            // A truncated key file would be refused later with a confusing message; remove it now.
            unlink(path)
            throw GeminusError(.keyFile, "cannot write pair key file \(path): \(Socket.describe(errno: failure))")
        }
    }

    static func encodeHex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0x0F)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decodeHex(_ text: some Collection<UInt8>) -> [UInt8]? {
        guard text.count % 2 == 0 else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        var out = [UInt8]()
        out.reserveCapacity(text.count / 2)
        var high: UInt8?
        for c in text {
            guard let n = nibble(c) else { return nil }
            if let h = high {
                out.append(h << 4 | n)
                high = nil
            } else {
                high = n
            }
        }
        return out
    }
}
