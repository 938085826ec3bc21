import CZlib
import CZstd

/// Compressed cluster codecs: zlib as a raw deflate stream (window bits -12, no zlib header),
/// and zstd frames (compression_type 1). Decompression produces exactly one cluster and must
/// fill it: the compressed descriptor may cover more bytes than the stream needs.
/// (Compression is `QCOW2ClusterCompressor`, in QCOW2Image+WriteCompressed.swift: it keeps
/// its codec state and output buffer, so nothing is allocated per cluster.)
public enum QCOW2Compression: UInt8, Sendable {
    case zlib = 0
    case zstd = 1

    public var name: String { self == .zlib ? "zlib" : "zstd" }

    /// Decompresses `input` into `output`, which must be filled completely.
    /// Returns false when the stream is invalid or too short for a whole cluster.
    public func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let outBase = output.baseAddress, output.count > 0 else { return false }
        switch self {
        case .zlib: return QCOW2Compression.inflateRaw(input, outBase, output.count)
        case .zstd: return QCOW2Compression.zstdDecompress(input, outBase, output.count)
        }
    }

    // MARK: - zlib

    private static func inflateRaw(_ input: UnsafeRawBufferPointer, _ out: UnsafeMutableRawPointer, _ outCount: Int) -> Bool {
        var stream = z_stream()
        // inflateInit2 is a C macro; call the function it expands to.
        guard inflateInit2_(&stream, -12, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return false }
        defer { inflateEnd(&stream) }
        // Sound: zlib only reads next_in (the const is lost in the C declaration) within
        // avail_in bytes, and writes next_out within avail_out bytes; both buffers outlive the call.
        stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(clamping: input.count)
        stream.next_out = out.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(outCount)
        let r = inflate(&stream, Z_FINISH)
        // Z_BUF_ERROR with a full output means the stream goes on past one cluster: QEMU
        // accepts that (the cluster is complete), and so do we.
        return (r == Z_STREAM_END || r == Z_BUF_ERROR) && stream.avail_out == 0
    }

    // MARK: - zstd

    private static func zstdDecompress(_ input: UnsafeRawBufferPointer, _ out: UnsafeMutableRawPointer, _ outCount: Int) -> Bool {
        guard let ctx = ZSTD_createDCtx() else { return false }
        defer { ZSTD_freeDCtx(ctx) }
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = ZSTD_outBuffer(dst: out, size: outCount, pos: 0)
        // Stop as soon as one cluster is out; a call that makes no progress means the input is
        // exhausted or broken (so this never loops forever).
        while outBuf.pos < outBuf.size {
            let lastIn = inBuf.pos, lastOut = outBuf.pos
            let r = ZSTD_decompressStream(ctx, &outBuf, &inBuf)
            if ZSTD_isError(r) != 0 { return false }
            if inBuf.pos == lastIn && outBuf.pos == lastOut { return false }
        }
        return true
    }
}
