#if canImport(Glibc)
import Glibc
#endif
import GeminusCore

/// A resolved IPv4 or IPv6 address with its port, in the form the socket calls take.
struct SocketAddress {
    var storage = sockaddr_storage()
    var length: socklen_t = 0

    var family: Int32 { Int32(storage.ss_family) }

    func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafePointer(to: storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
        }
    }

    /// "127.0.0.1:7400" or "[::1]:7400".
    var description: String {
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        let r = withSockaddr { sa, len in
            getnameinfo(sa, len, &host, socklen_t(host.count), &service, socklen_t(service.count),
                        NI_NUMERICHOST | NI_NUMERICSERV)
        }
        guard r == 0 else { return "?" }
        let h = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let s = String(decoding: service.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return family == AF_INET6 ? "[\(h)]:\(s)" : "\(h):\(s)"
    }

    /// The local or remote address of a connected or bound socket.
    static func of(fd: Int32, peer: Bool) -> SocketAddress? {
        var a = SocketAddress()
        a.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let r = withUnsafeMutablePointer(to: &a.storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                peer ? getpeername(fd, sa, &a.length) : getsockname(fd, sa, &a.length)
            }
        }
        return r == 0 ? a : nil
    }

    var port: UInt16 {
        withUnsafePointer(to: storage) { p in
            if family == AF_INET6 {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
    }

    /// "[::1]" is how operators write IPv6 next to a port; the resolver wants it bare.
    static func bareHost(_ host: String) -> String {
        if host.hasPrefix("["), host.hasSuffix("]") { return String(host.dropFirst().dropLast()) }
        return host
    }

    /// All addresses `host` names, in the resolver's preferred order ("localhost" may give
    /// ::1 before 127.0.0.1, so dialers try each).
    static func resolve(host: String, port: UInt16, passive: Bool) throws(GeminusError) -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)
        var list: UnsafeMutablePointer<addrinfo>?
        let bare = bareHost(host)
        let r = getaddrinfo(bare.isEmpty ? nil : bare, String(port), &hints, &list)
        guard r == 0, let list else {
            let why = String(cString: gai_strerror(r))
            throw GeminusError(.invalidArgument, "cannot resolve host '\(host)': \(why)",
                               fix: "use an IP address such as 127.0.0.1 or a name this host can resolve")
        }
        defer { freeaddrinfo(list) }
        var out: [SocketAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = list
        while let ai = cursor {
            if let sa = ai.pointee.ai_addr, Int(ai.pointee.ai_addrlen) <= MemoryLayout<sockaddr_storage>.size {
                var a = SocketAddress()
                a.length = ai.pointee.ai_addrlen
                withUnsafeMutableBytes(of: &a.storage) { dst in
                    dst.copyMemory(from: UnsafeRawBufferPointer(start: sa, count: Int(ai.pointee.ai_addrlen)))
                }
                out.append(a)
            }
            cursor = ai.pointee.ai_next
        }
        if out.isEmpty {
            throw GeminusError(.invalidArgument, "host '\(host)' has no IPv4 or IPv6 address")
        }
        return out
    }
}
