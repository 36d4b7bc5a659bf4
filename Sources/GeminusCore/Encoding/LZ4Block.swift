import CLZ4

/// LZ4 block compression of single pages. One compressor per thread: it keeps LZ4's 16 KiB
/// hash table and resets it the cheap way between pages (a full reset would cost more than
/// compressing a lightly changed page).
public final class LZ4PageCompressor {
    private let stream: UnsafeMutablePointer<LZ4_stream_t>

    public init() {
        stream = LZ4_createStream()
    }

    deinit { LZ4_freeStream(stream) }

    /// Compresses `count` bytes into `dst`; returns the compressed length, or 0 when the
    /// result would not fit in `capacity` (the caller then sends the page raw).
    public func compress(_ src: UnsafeRawPointer, count: Int, into dst: UnsafeMutableRawPointer, capacity: Int) -> Int {
        LZ4_resetStream_fast(stream)
        let n = LZ4_compress_fast_continue(stream, src.assumingMemoryBound(to: CChar.self),
                                           dst.assumingMemoryBound(to: CChar.self), Int32(count), Int32(capacity), 1)
        return Int(max(0, n))
    }
}

public enum LZ4Page {
    /// Decompresses an LZ4 block that must expand to exactly one page. False for anything
    /// else (malformed input, wrong size): LZ4_decompress_safe never writes past `dst`.
    public static func decompress(_ src: UnsafeRawPointer, count: Int, into dst: UnsafeMutableRawPointer) -> Bool {
        let n = LZ4_decompress_safe(src.assumingMemoryBound(to: CChar.self), dst.assumingMemoryBound(to: CChar.self),
                                    Int32(count), Int32(GuestPage.size))
        return n == GuestPage.size
    }
}
