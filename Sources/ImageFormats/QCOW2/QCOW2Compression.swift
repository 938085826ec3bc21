import CDeflate
import CZlib
import CZstd
import DiskIO

/// Compressed cluster codecs: deflate as a raw stream (no zlib header; compression_type 0,
/// "zlib"), and zstd frames (compression_type 1). Decompression produces exactly one cluster and
/// must fill it: the compressed descriptor may cover more bytes than the stream needs.
/// Decompression is `QCOW2Decompressor` (below), compression `QCOW2ClusterCompressor` (in
/// QCOW2Image+WriteCompressed.swift): both keep their codec state, so nothing is allocated per
/// cluster.
public enum QCOW2Compression: UInt8, Sendable {
    case zlib = 0
    case zstd = 1

    public var name: String { self == .zlib ? "zlib" : "zstd" }

    /// Decompresses `input` into `output`, which must be filled completely, with a decompressor
    /// made for this one call (readers that decompress many clusters keep a `QCOW2Decompressor`).
    /// Returns false when the stream is invalid or too short for a whole cluster.
    public func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let d = try? QCOW2Decompressor(codec: self) else { return false }
        return d.decompress(input, into: output)
    }
}

/// Decompresses clusters of one codec, keeping its contexts from one cluster to the next: a
/// libdeflate decompressor and a zlib stream (the fallback) for deflate, a ZSTD_DCtx for zstd.
///
/// One instance is used by one thread at a time (an image keeps one for its reads; a parallel
/// reader gives each worker its own).
public final class QCOW2Decompressor: @unchecked Sendable {
    // @unchecked Sendable: the contexts are used by one thread at a time (see above) and
    // nothing is shared between instances.

    public let codec: QCOW2Compression
    private let libdeflate: OpaquePointer?
    /// Allocated so it never moves: zlib keeps a pointer back to its stream.
    private let zstream: UnsafeMutablePointer<z_stream>?
    private let zstd: OpaquePointer?

    public init(codec: QCOW2Compression) throws {
        self.codec = codec
        switch codec {
        case .zlib:
            guard let d = libdeflate_alloc_decompressor() else {
                throw AllocationError(byteCount: 0, alignment: 8, code: 12)
            }
            let s = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            s.initialize(to: z_stream())
            // inflateInit2 is a C macro; call the function it expands to. Window bits -12: raw
            // deflate as QEMU inflates it (one call for the whole cluster, so distances up to
            // what is already out are accepted, 32 KiB-window streams included).
            guard inflateInit2_(s, -12, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                s.deallocate()
                libdeflate_free_decompressor(d)
                throw AllocationError(byteCount: MemoryLayout<z_stream>.size, alignment: 8, code: 12)
            }
            libdeflate = d
            zstream = s
            zstd = nil
        case .zstd:
            guard let ctx = ZSTD_createDCtx() else { throw AllocationError(byteCount: 0, alignment: 8, code: 12) }
            libdeflate = nil
            zstream = nil
            zstd = ctx
        }
    }

    deinit {
        if let libdeflate { libdeflate_free_decompressor(libdeflate) }
        if let zstream {
            inflateEnd(zstream)
            zstream.deallocate()
        }
        if let zstd { ZSTD_freeDCtx(zstd) }
    }

    /// Decompresses `input` into `output`, which must be filled completely.
    /// Returns false when the stream is invalid or too short for a whole cluster.
    public func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let outBase = output.baseAddress, output.count > 0 else { return false }
        switch codec {
        case .zlib: return inflateRaw(input, outBase, output.count)
        case .zstd: return zstdDecompress(input, outBase, output.count)
        }
    }

    // MARK: - deflate

    private func inflateRaw(_ input: UnsafeRawBufferPointer, _ out: UnsafeMutableRawPointer, _ outCount: Int) -> Bool {
        guard let d = libdeflate, let s = zstream else { return false }
        var consumed = 0
        // Sound: libdeflate reads `in` within input.count bytes and writes `out` within outCount
        // bytes; both buffers outlive the call. A null actual_out means "must fill the cluster".
        let r = libdeflate_deflate_decompress_ex(d, input.baseAddress, input.count, out, outCount, &consumed, nil)
        if r == LIBDEFLATE_SUCCESS { return true }
        // libdeflate wants a proper final block that ends exactly at the cluster's end. QEMU
        // (zlib) also takes a stream that fills the cluster and goes on, or stops without a
        // final block (a flush without Z_FINISH): zlib decides those, so every stream QEMU reads
        // still reads (and the broken ones fail the same).
        guard inflateReset(s) == Z_OK else { return false }
        // Sound: zlib only reads next_in (the const is lost in the C declaration) within
        // avail_in bytes, and writes next_out within avail_out bytes; both buffers outlive the call.
        s.pointee.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        s.pointee.avail_in = uInt(clamping: input.count)
        s.pointee.next_out = out.assumingMemoryBound(to: Bytef.self)
        s.pointee.avail_out = uInt(outCount)
        let z = inflate(s, Z_FINISH)
        // Z_BUF_ERROR with a full output means the stream goes on past one cluster: QEMU
        // accepts that (the cluster is complete), and so do we.
        return (z == Z_STREAM_END || z == Z_BUF_ERROR) && s.pointee.avail_out == 0
    }

    // MARK: - zstd

    private func zstdDecompress(_ input: UnsafeRawBufferPointer, _ out: UnsafeMutableRawPointer, _ outCount: Int) -> Bool {
        guard let ctx = zstd else { return false }
        // A failed cluster may leave the context mid-frame: start each one afresh.
        if ZSTD_isError(ZSTD_DCtx_reset(ctx, ZSTD_reset_session_only)) != 0 { return false }
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
