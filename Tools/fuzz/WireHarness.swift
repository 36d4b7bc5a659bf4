// libFuzzer target for the rest of the agents' untrusted inputs (issue 18, review M2, L1, M8):
// the handshake hello, nack payloads, disk writes into a replica that has a disk (with 64-bit
// epochs and generations), the guest NIC's frame stream and the NBD server's request parsing.
// Built by Tools/fuzz/build.sh from the real sources (GeminusCore, GeminusHypervisor, and the
// few files of GeminusTransport and GeminusQEMU named there) compiled into one module.
//
// Input: first byte picks the target (mod 5), the rest is that target's input.
//   0 hello  1 nack  2 replica+disk (frames `kind u8, epoch u64, sequence u32, gen u8, len u16,
//   payload`, sealed by the harness)  3 NIC stream (first byte: chunk size)  4 NBD (bytes a
//   client sends after the server's greeting)
#if canImport(Glibc)
import Glibc
#endif
import Foundation

// MARK: - 0: the hello

func fuzzHello(_ bytes: [UInt8]) {
    guard let h = PeerHello(decoding: bytes) else { return }
    // What the admission and takeover code does with a hello must not trap.
    precondition(h.guestPageCount <= GuestPage.maxCount, "hello: page count past the bound decoded")
    _ = h.guestPageCount * UInt64(GuestPage.size)
    _ = Int(h.guestPageCount)
    _ = h.generation.next.next
    _ = h.committedEpoch.next.next
    guard let again = try? h.encoded() else { preconditionFailure("hello: a decoded hello does not encode") }
    precondition(PeerHello(decoding: again) == h, "hello: decode(encode(h)) != h")
}

// MARK: - 1: nack

func fuzzNack(_ bytes: [UInt8]) {
    guard let n = Nack(decoding: bytes) else { return }
    precondition(n.detail.utf8.count <= 4 * Nack.maxDetailBytes, "nack: detail longer than its bound allows")
    let again = n.encoded()
    precondition(Nack(decoding: again)?.reason == n.reason, "nack: the reason does not survive a round trip")
}

// MARK: - 2: disk writes into a replica with a disk

final class FuzzDisk: ReplicaDisk {
    var bytes = [UInt8](repeating: 0, count: 64 << 10)
    var sizeBytes: UInt64 { UInt64(bytes.count) }
    func write(offset: UInt64, _ data: [UInt8]) throws(GeminusError) {
        precondition(offset <= sizeBytes && UInt64(data.count) <= sizeBytes - offset, "disk: write beyond the disk reached it")
        bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
    }
    func zero(offset: UInt64, length: UInt64) throws(GeminusError) {
        precondition(offset <= sizeBytes && length <= sizeBytes - offset, "disk: zeroing beyond the disk reached it")
        bytes.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
    }
    func zeroAll() throws(GeminusError) { bytes = [UInt8](repeating: 0, count: bytes.count) }
    func sync() throws(GeminusError) {}
}

let diskPages = 4

func diskReplica() -> (Replica, FuzzDisk) {
    let disk = FuzzDisk()
    let replica = Replica(memory: try! PageMemory(pageCount: diskPages), generation: Generation(1), disk: disk)
    let buffer = CheckpointBuffer(limitPages: diskPages)
    buffer.isFull = true
    let page = [UInt8](repeating: 0x5A, count: GuestPage.size)
    page.withUnsafeBytes { raw in for p in 0..<diskPages { _ = buffer.appendPage(index: p, copying: raw.baseAddress!) } }
    buffer.deviceState = Array("dev".utf8)
    buffer.diskSizeBytes = disk.sizeBytes
    buffer.diskWrites = [DiskWrite(offset: 4096, data: [UInt8](repeating: 7, count: 512))]
    let encoder = try! CheckpointEncoder(pageCount: diskPages, maxFramePayload: 16 << 10)
    var d = FrameDecoder()
    _ = encoder.encode(buffer, epoch: Epoch(1), generation: Generation(1), baseEpoch: .none) { d.feed($0) }
    while let f = try! d.next() { _ = replica.accept(f) }
    precondition(replica.committedEpoch == Epoch(1), "harness: the disk replica's base epoch did not commit")
    return (replica, disk)
}

func fuzzDiskReplica(_ bytes: [UInt8]) {
    let (replica, disk) = diskReplica()
    var r = ByteReader(bytes)
    let kinds: [FrameKind] = [.epochBegin, .pages, .deviceState, .diskWrites, .epochEnd]
    while let k = r.u8(), let epoch = r.u64(), let sequence = r.u32(), let g = r.u8(), let length = r.u16() {
        let payload = Array(r.take(min(Int(length), r.remaining)) ?? [])
        // Generations near both ends: the pair's own, an older, a newer, and UInt64.max.
        let generation: UInt64 = [1, 0, 2, UInt64.max][Int(g) % 4]
        let header = FrameHeader(kind: kinds[Int(k) % kinds.count], generation: Generation(generation), epoch: Epoch(epoch), sequence: sequence)
        var d = FrameDecoder()
        d.feed(FrameCodec.encode(header, payload: payload))
        guard let frame = try? d.next() else { preconditionFailure("harness: a sealed frame did not decode") }
        let (memoryBefore, diskBefore, epochBefore) = (digest(replica), disk.bytes, replica.committedEpoch)
        switch replica.accept(frame) {
        case .committed(let e, _):
            precondition(e > epochBefore && e.isAcceptable, "S3: commit of epoch \(e) after \(epochBefore)")
            _ = e.next
        case .staged, .rejected, .ignored:
            precondition(replica.committedEpoch == epochBefore && digest(replica) == memoryBefore, "S3: replica changed without a commit")
            precondition(disk.bytes == diskBefore, "S3: disk changed without a commit")
        }
    }
}

func digest(_ r: Replica) -> UInt64 {
    var d = ContentDigest()
    d.add(UnsafeRawBufferPointer(start: r.memory.base, count: r.memory.byteCount))
    return d.value
}

// MARK: - 3: the NIC stream

func fuzzNICStream(_ bytes: [UInt8]) {
    guard let first = bytes.first else { return }
    let input = Array(bytes.dropFirst())
    let chunk = Int(first) + 1
    var whole = NICFrameStream(), pieces = NICFrameStream()
    var a: [[UInt8]] = [], b: [[UInt8]] = []
    whole.feed(input[...], into: &a)
    var i = 0
    while i < input.count {
        pieces.feed(input[i..<min(i + chunk, input.count)], into: &b)
        i += chunk
    }
    precondition(a == b, "NIC: frames depend on how the stream was cut")
    precondition(whole.oversizeFrames == pieces.oversizeFrames, "NIC: oversize count depends on the cut")
    precondition(a.allSatisfy { $0.count <= NICFrameStream.maxFrameBytes }, "NIC: a frame over the bound came out")
}

// MARK: - 4: the NBD server

let nbdDirectory = NSTemporaryDirectory() + "geminus-fuzz-nbd-\(getpid())"
let nbdExport: NBDExport = {
    mkdir(nbdDirectory, 0o700)
    return try! NBDExport(socketPath: nbdDirectory + "/nbd", diskPath: nil, sizeBytes: 1 << 20)
}()

func fuzzNBD(_ bytes: [UInt8]) {
    let export = nbdExport
    export.collect { true }
    guard let fd = try? UnixSocket.connect(path: export.socketPath, timeout: 2, what: "the export") else {
        preconditionFailure("NBD: cannot connect to the export")
    }
    defer { close(fd) }
    var timeout = timeval(tv_sec: 2, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    // A reader keeps the server's replies flowing while the input is sent.
    let reader = Thread {
        var sink = [UInt8](repeating: 0, count: 65536)
        while sink.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, $0.count, 0) }) > 0 {}
    }
    reader.start()
    var off = 0
    while off < bytes.count {
        let w = bytes[off...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard w > 0 else { break }
        off += w
    }
    shutdown(fd, Int32(SHUT_WR))
    while !reader.isFinished { usleep(100) }
    let kept = export.take()
    precondition(kept.allSatisfy { $0.offset <= export.sizeBytes && $0.length <= export.sizeBytes - $0.offset }, "NBD: a write outside the export was kept")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWireInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = Array(UnsafeBufferPointer(start: data, count: size))
    guard let target = input.first else { return 0 }
    let rest = Array(input.dropFirst())
    switch target % 5 {
    case 0: fuzzHello(rest)
    case 1: fuzzNack(rest)
    case 2: fuzzDiskReplica(rest)
    case 3: fuzzNICStream(rest)
    default: fuzzNBD(rest)
    }
    return 0
}
