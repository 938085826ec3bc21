import CZlib
import Foundation
import Testing
import TestSupport

/// Compressed clusters with libdeflate (deflate) and reused zstd contexts, against qemu-img:
/// simg's compressed images pass `qemu-img check` and compare identical; qemu-img's compressed
/// images (zlib and zstd, 512 B to 2 MiB clusters) convert byte-identically; a deflate stream
/// that fills its cluster without a final block (which libdeflate refuses and QEMU's zlib reads)
/// reads as QEMU reads it.
@Suite struct DeflateInteropTests {
    static let clusterSizes = ["512", "4096", "65536", "2M"]
    static let codecs = ["zlib", "zstd"]

    /// 6 MiB: 4 MiB of text, 1 MiB of random bytes (stored uncompressed), a 1 MiB hole, and a
    /// text tail that is not cluster-aligned.
    static func makeSource(_ dir: TempDir) throws -> String {
        let path = dir.file("source.raw")
        try ConvertQCOW2Tests.writeText(path, offset: 0, count: 4 << 20)
        try convertWritePattern(path, offset: 4 << 20, count: 1 << 20, seed: 9)
        try ConvertQCOW2Tests.writeText(path, offset: (6 << 20) - 5000, count: 3000)
        try convertTruncate(path, to: 6 << 20)
        return path
    }

    static var matrix: [(String, String)] { codecs.flatMap { c in clusterSizes.map { (c, $0) } } }

    @Test(arguments: matrix)
    func simgCompressedReadsInQemu(_ codec: String, _ clusterSize: String) throws {
        let dir = try TempDir()
        let source = try Self.makeSource(dir)
        let ours = dir.file("simg.qcow2")
        try simgConvertOK(["-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=\(codec),cluster_size=\(clusterSize)", source, ours])
        try qemuImg("check", ours)
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, ours)
        // qemu-img's own reading of every cluster, byte for byte.
        let back = dir.file("back.raw")
        try qemuImg("convert", "-f", "qcow2", "-O", "raw", ours, back)
        #expect(try filesEqual(source, back))
    }

    @Test(arguments: matrix)
    func qemuCompressedConvertsIdentically(_ codec: String, _ clusterSize: String) throws {
        let dir = try TempDir()
        let source = try Self.makeSource(dir)
        let theirs = dir.file("qemu.qcow2")
        try qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=\(codec),cluster_size=\(clusterSize)", source, theirs)
        let ours = dir.file("simg.raw"), reference = dir.file("qemu.raw")
        try simgConvertOK(["-f", "qcow2", "-O", "raw", theirs, ours])
        try qemuImg("convert", "-f", "qcow2", "-O", "raw", theirs, reference)
        #expect(try filesEqual(ours, reference))
        #expect(try filesEqual(ours, source))
    }

    /// Raw deflate (window bits -12, as QEMU) of `data` with Z_SYNC_FLUSH and no Z_FINISH: the
    /// stream has no final block.
    static func unterminatedDeflate(_ data: [UInt8]) throws -> [UInt8] {
        var s = z_stream()
        guard deflateInit2_(&s, 6, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw ToolError.missing("deflateInit2")
        }
        defer { deflateEnd(&s) }
        var out = [UInt8](repeating: 0, count: data.count + 1024)
        var input = data
        let produced = input.withUnsafeMutableBytes { inp in
            out.withUnsafeMutableBytes { o -> Int in
                // Sound: zlib reads within avail_in bytes and writes within avail_out bytes of
                // these two buffers, which outlive the call.
                s.next_in = inp.baseAddress!.assumingMemoryBound(to: Bytef.self)
                s.avail_in = uInt(inp.count)
                s.next_out = o.baseAddress!.assumingMemoryBound(to: Bytef.self)
                s.avail_out = uInt(o.count)
                return deflate(&s, Z_SYNC_FLUSH) == Z_OK && s.avail_in == 0 ? o.count - Int(s.avail_out) : -1
            }
        }
        guard produced > 0 else { throw ToolError.missing("deflate output") }
        return Array(out[0..<produced])
    }

    static func readBE(_ path: String, at offset: UInt64) throws -> UInt64 {
        let h = try #require(FileHandle(forReadingAtPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: offset)
        let bytes = try #require(try h.read(upToCount: 8))
        return bytes.reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// A 64 KiB-cluster image whose first cluster is a hand-made deflate stream that fills the
    /// cluster and goes on (the stream holds the cluster and 8 KiB more, with no final block).
    /// libdeflate refuses it; qemu-img reads it (zlib stops when the cluster is full), so simg
    /// falls back to zlib and reads the same bytes.
    @Test func unterminatedStreamReadsAsInQemu() throws {
        let dir = try TempDir()
        let image = dir.file("hand.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, "1M")
        try qemuIO("-f", "qcow2", "-c", "write -c -P 0x33 0 64k", image)
        let text = dir.file("text.raw")
        try ConvertQCOW2Tests.writeText(text, offset: 0, count: 65536 + 8192)
        let data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: text)))
        let stream = try Self.unterminatedDeflate(data)

        // Header -> L1[0] -> L2[0]: the compressed descriptor (cluster_bits 16: the host offset
        // in bits 0-53, the sector count - 1 in bits 54-61, bit 62 the compressed flag).
        let l1 = try Self.readBE(image, at: 40)
        let l2 = try Self.readBE(image, at: l1) & 0x00ff_ffff_ffff_fe00
        let entry = try Self.readBE(image, at: l2)
        #expect(entry & (1 << 62) != 0, "the first cluster is not compressed")
        let host = entry & ((1 << 54) - 1)
        // qemu-io put the tiny stream at the start of a fresh host cluster: ours (about 20 KiB)
        // stays inside it, so the refcounts stay right.
        #expect(host % 65536 == 0 && stream.count < 65536 / 2, "host \(host), stream \(stream.count) bytes")
        let sectors = UInt64(stream.count + 511) / 512
        let newEntry = (UInt64(1) << 62) | ((sectors - 1) << 54) | host
        try writeBytes(stream + [UInt8](repeating: 0, count: Int(sectors) * 512 - stream.count), to: image, at: host)
        try writeBytes((0..<8).map { UInt8(truncatingIfNeeded: newEntry >> (56 - 8 * $0)) }, to: image, at: l2)

        try qemuImg("check", image)
        let ours = dir.file("simg.raw"), reference = dir.file("qemu.raw")
        try qemuImg("convert", "-f", "qcow2", "-O", "raw", image, reference)
        try simgConvertOK(["-f", "qcow2", "-O", "raw", image, ours])
        #expect(try filesEqual(ours, reference))
        let first = try FileHandle(forReadingFrom: URL(fileURLWithPath: ours)).read(upToCount: 65536)
        #expect(first.map { [UInt8]($0) } == Array(data[0..<65536]))
        // The same stream compressed again by simg (libdeflate) reads back in qemu-img.
        let again = dir.file("again.qcow2")
        try simgConvertOK(["-c", "-f", "qcow2", "-O", "qcow2", image, again])
        try qemuImg("check", again)
        try qemuImg("compare", "-f", "qcow2", "-F", "qcow2", image, again)
    }
}
