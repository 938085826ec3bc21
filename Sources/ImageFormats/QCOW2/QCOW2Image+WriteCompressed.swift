import CDeflate
import CZstd
import DiskIO

/// Where compressed clusters are packed: like QEMU, compressed streams are placed byte after
/// byte in a host cluster (not sector-aligned), a stream may continue into the next host
/// cluster when that one is allocated right after it, and every host cluster a stream touches
/// has its refcount raised once for that stream.
final class QCOW2CompressedArea {
    /// Host byte offset where the next stream may start, inside a partly filled host cluster;
    /// 0 when there is none (the next stream starts a new host cluster).
    var nextOffset: UInt64 = 0
    /// Reused, aligned staging memory for runs of streams that are contiguous on the host.
    var staging: AlignedBuffer?
    /// The bytes from the start of the I/O block holding `nextOffset` up to it (what the last
    /// run wrote there), so that the next run can be written as whole aligned blocks (O_DIRECT
    /// without read-modify-write).
    var lastBlockStart: UInt64 = 0
    var lastBlock: [UInt8] = []

    /// Called when clusters were freed: the partly filled one may be among them.
    func forgetPartialCluster() {
        nextOffset = 0
        lastBlock.removeAll(keepingCapacity: true)
    }

    /// Staging memory of at least `count` bytes.
    func stagingBuffer(_ count: Int) throws -> AlignedBuffer {
        if let staging, staging.count >= count { return staging }
        let buffer = try AlignedBuffer(byteCount: max(count, 1 << 20))
        staging = buffer
        return buffer
    }
}

/// One compressed cluster for `QCOW2Image.writeCompressedClusters` (the format-neutral
/// `CompressedCluster` of WriteCapabilities.swift).
public typealias QCOW2CompressedCluster = CompressedCluster

/// Compressed cluster writes (QEMU's qcow2_co_pwritev_compressed_part and qcow2_alloc_bytes).
///
/// - The guest cluster must not have a host cluster in this layer (unallocated, or zero without
///   a preallocated host cluster), as QEMU requires; the entry then becomes a compressed
///   descriptor (COPIED clear; extended L2 entries get an all-zero bitmap, as the spec says).
/// - Images with an external data file are refused (QEMU: not supported).
/// - Order: stream data, then refcounts (the L2 cache flushes refcount blocks before any L2
///   table it writes back), then the L2 entry.
extension QCOW2Image {
    /// The codec the image's header selects (zlib, or zstd with compression_type=zstd).
    public var compressionCodec: QCOW2Compression { compression }

    /// Writes one compressed cluster (`compressed` is a whole cluster's compressed stream in
    /// the image's codec, shorter than the cluster size) for the cluster at `guestOffset`.
    public func writeCompressedCluster(guestOffset: UInt64, compressed: UnsafeRawBufferPointer) throws {
        var one = QCOW2CompressedCluster(guestOffset: guestOffset, data: compressed)
        try withUnsafePointer(to: &one) { try writeCompressedClusters(UnsafeBufferPointer(start: $0, count: 1)) }
    }

    public func writeCompressedClusters(_ clusters: [QCOW2CompressedCluster]) throws {
        try clusters.withUnsafeBufferPointer { try writeCompressedClusters($0) }
    }

    /// Writes several compressed clusters; streams that land next to each other on the host
    /// go out in one write.
    public func writeCompressedClusters(_ clusters: UnsafeBufferPointer<QCOW2CompressedCluster>) throws {
        guard !clusters.isEmpty else { return }
        let state = try writer()
        if header.hasDataFile {
            throw ImageError(path: path, message: "compressed writes are not supported for images with an external data file")
        }
        let cs = UInt64(clusterSize)
        // Validate everything before allocating anything, so a refused batch leaks nothing.
        for c in clusters {
            guard c.guestOffset % cs == 0, c.guestOffset < virtualSize else {
                throw ImageError(path: path, message: "compressed write at guest offset \(c.guestOffset) is not at a cluster boundary inside the image (virtual size \(virtualSize))")
            }
            guard c.data.count > 0, c.data.count < clusterSize else {
                throw ImageError(path: path, message: "compressed cluster for guest offset \(c.guestOffset) is \(c.data.count) bytes; it must be between 1 and \(clusterSize - 1)")
            }
            let entry = try l2Mapping(guest: c.guestOffset).entry
            if entry.isCompressed || entry.hostOffset != 0 {
                throw ImageError(path: path, message: "cannot write a compressed cluster at guest offset \(QCOW2BE.hex(c.guestOffset)): the cluster is already allocated")
            }
        }
        for c in clusters { markBitmapsDirty(c.guestOffset, min(cs, virtualSize - c.guestOffset)) }

        // Place the streams and write them, one host write per contiguous run. With O_DIRECT
        // a run is widened to whole I/O blocks: the head from what the previous run left in
        // its last block, the tail zero-padded (later streams rewrite it).
        let area = state.compressedArea
        // Widening is only safe when an I/O block never covers more than one cluster (else the
        // padding or a stale head could overwrite a neighbouring cluster): unit <= cluster size.
        let directUnit = file.isDirect ? file.dioAlignment().offset : 1
        let unit = directUnit <= clusterSize ? directUnit : 1
        var total = 0
        for c in clusters { total += c.data.count }
        let staging = try area.stagingBuffer(total + 2 * unit)
        var hosts = [UInt64](repeating: 0, count: clusters.count)
        var runStart: UInt64 = 0
        var runLength = 0
        var head = 0
        func flushRun() throws {
            guard runLength > 0 else { return }
            let end = runStart + UInt64(runLength)
            var start = runStart
            var count = runLength
            var at = head
            var widened = false
            if unit > 1 {
                let blockStart = runStart / UInt64(unit) * UInt64(unit)
                if head == 0 || (area.lastBlockStart == blockStart && area.lastBlock.count == head) {
                    widened = true
                    // Sound: head <= unit and the staging buffer has unit bytes before the run.
                    area.lastBlock.withUnsafeBytes { staging.baseAddress.copyMemory(from: $0.baseAddress ?? UnsafeRawPointer(staging.baseAddress), byteCount: head) }
                    let padded = (head + runLength + unit - 1) / unit * unit
                    (staging.baseAddress + head + runLength).initializeMemory(as: UInt8.self, repeating: 0, count: padded - head - runLength)
                    start = blockStart
                    count = padded
                    at = 0
                }
            }
            try file.qcow2Write(UnsafeRawBufferPointer(start: staging.baseAddress + at, count: count), at: start)
            if unit > 1 {
                // Remember the bytes of the block the run ended in.
                let lastStart = end / UInt64(unit) * UInt64(unit)
                let keep = Int(end - lastStart)
                area.lastBlockStart = lastStart
                if keep <= runLength || widened {
                    // Sound: widened, the staging buffer holds the block's head before the run.
                    let from = head + runLength - keep
                    area.lastBlock = Array(UnsafeRawBufferPointer(start: staging.baseAddress + from, count: keep))
                } else {
                    // The block's head is not in memory: the next run there is not widened.
                    area.lastBlock.removeAll(keepingCapacity: true)
                    area.lastBlockStart = UInt64.max
                }
            }
            runLength = 0
        }
        for (k, c) in clusters.enumerated() {
            let host = try allocateCompressedBytes(UInt64(c.data.count), state)
            hosts[k] = host
            if runLength > 0 && runStart + UInt64(runLength) != host { try flushRun() }
            if runLength == 0 {
                runStart = host
                head = Int(host % UInt64(unit))
            }
            // Sound: head + total bytes of the batch + unit <= staging.count.
            (staging.baseAddress + head + runLength).copyMemory(from: c.data.baseAddress!, byteCount: c.data.count)
            runLength += c.data.count
        }
        try flushRun()

        // Then the L2 entries.
        let extended = header.hasExtendedL2
        for (k, c) in clusters.enumerated() {
            let descriptor = QCOW2CompressedDescriptor.covering(hostOffset: hosts[k], length: UInt64(c.data.count))
            let raw = QCOW2L2Entry.compressed(descriptor, clusterBits: header.clusterBits).raw
            let table = try writableL2(l1Index: Int(c.guestOffset / header.bytesPerL2Table), state)
            let i = l2Index(c.guestOffset)
            try tableCache.update(at: table) { words in
                if extended {
                    words[2 * i] = raw
                    words[2 * i + 1] = 0
                } else {
                    words[i] = raw
                }
            }
        }
        invalidateDecompressedCache()
    }

    /// Reserves `n` (< cluster size) bytes for a compressed stream, QEMU's way: after the
    /// previous stream when the partly filled host cluster has room (or the next host cluster
    /// is allocated right after it) and its refcount can still grow; else at a new cluster.
    private func allocateCompressedBytes(_ n: UInt64, _ state: QCOW2WriteState) throws -> UInt64 {
        let cs = UInt64(clusterSize)
        let bits = UInt64(header.clusterBits)
        let refcounts = state.refcounts
        let area = state.compressedArea
        var offset = area.nextOffset
        if offset != 0 {
            let count = try refcounts.refcount(ofCluster: offset >> bits)
            if count == 0 || count >= refcounts.maxRefcount { offset = 0 }
        }
        if offset == 0 {
            offset = try refcounts.allocate(count: 1).offset
        } else if n <= cs - offset % cs {
            try refcounts.adjust(cluster: offset >> bits, count: 1, by: 1)
        } else {
            // The stream needs part of a second cluster (refcount 1 from allocation).
            let next = try refcounts.allocate(count: 1).offset
            if next == (offset / cs + 1) * cs {
                try refcounts.adjust(cluster: offset >> bits, count: 1, by: 1)
            } else {
                offset = next
            }
        }
        // The descriptor's offset field has 62 - (cluster_bits - 8) bits (and at most 56).
        let fieldBits = min(QCOW2CompressedDescriptor.sectorShift(clusterBits: header.clusterBits), 56)
        guard offset + n <= UInt64(1) << fieldBits else {
            throw ImageError(path: path, message: "compressed cluster at host offset \(QCOW2BE.hex(offset)) is beyond what a compressed descriptor can address with \(clusterSize)-byte clusters")
        }
        let end = offset + n
        area.nextOffset = end % cs == 0 ? 0 : end
        return offset
    }

    /// Pads the image file to a whole number of 512-byte sectors (QEMU does this at the end of
    /// a compressed conversion, as the last stream usually ends mid-sector).
    public func alignFileEndToSector() throws {
        guard isWritable else { return }
        let size = try file.size()
        if size % 512 != 0 { try file.truncate(to: (size + 511) / 512 * 512) }
    }
}

/// Compresses whole clusters for one worker, reusing its codec state and output buffer
/// (nothing is allocated per cluster). Deflate clusters are raw deflate streams from libdeflate
/// (level `deflateLevel`; QEMU uses zlib at level 6 with window bits -12, but inflates each
/// cluster in one call, so it reads libdeflate's 32 KiB-window streams), zstd clusters one
/// frame at the default level, as QEMU writes them.
///
/// One instance is used by one thread at a time.
public final class QCOW2ClusterCompressor: @unchecked Sendable {
    // @unchecked Sendable: owned by one worker thread at a time (the parallel compressor hands
    // each worker its own instance); nothing is shared between instances.

    public let codec: QCOW2Compression
    public let clusterSize: Int
    /// Output room: cluster_size - 1 bytes, QEMU's limit (a stream that does not fit means
    /// the cluster is stored uncompressed).
    private let output: UnsafeMutableRawBufferPointer
    private let libdeflate: OpaquePointer?
    private let zstd: OpaquePointer?

    /// libdeflate's level for deflate clusters, chosen by measurement (docs/BENCHMARKS.md,
    /// "Deflate level"): smaller than qemu-img's zlib level 6 (6-8 %) and 2-3 times faster per core.
    public static let deflateLevel: Int32 = 5

    public init(codec: QCOW2Compression, clusterSize: Int) throws {
        precondition(clusterSize >= 512, "cluster size too small")
        self.codec = codec
        self.clusterSize = clusterSize
        output = .allocate(byteCount: clusterSize - 1, alignment: 16)
        switch codec {
        case .zlib:
            guard let c = libdeflate_alloc_compressor(Self.deflateLevel) else {
                output.deallocate()
                throw AllocationError(byteCount: 0, alignment: 8, code: 12)
            }
            libdeflate = c
            zstd = nil
        case .zstd:
            guard let ctx = ZSTD_createCCtx() else {
                output.deallocate()
                throw AllocationError(byteCount: 0, alignment: 8, code: 12)
            }
            libdeflate = nil
            zstd = ctx
        }
    }

    deinit {
        if let libdeflate { libdeflate_free_compressor(libdeflate) }
        if let zstd { ZSTD_freeCCtx(zstd) }
        output.deallocate()
    }

    /// Compresses one whole cluster (`input.count == clusterSize`). Returns the stream, or nil
    /// when it would not be shorter than the cluster. The stream lies in this compressor's
    /// buffer: valid until the next call and only while the compressor is alive (keep it with
    /// `withExtendedLifetime` if its last use comes before the stream's).
    public func compress(_ input: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
        guard let n = compress(input, into: output) else { return nil }
        return UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(output)[0..<n])
    }

    /// Compresses one whole cluster into `output` (at most its first clusterSize - 1 bytes are
    /// used); returns the stream length, or nil when it does not fit.
    public func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        precondition(input.count == clusterSize, "compress takes exactly one cluster")
        let room = UnsafeMutableRawBufferPointer(rebasing: output[0..<min(output.count, clusterSize - 1)])
        switch codec {
        case .zlib: return deflateCluster(input, room)
        case .zstd: return zstdCluster(input, room)
        }
    }

    private func deflateCluster(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) -> Int? {
        guard let c = libdeflate else { return nil }
        // Sound: libdeflate reads `in` within input.count bytes and writes `out` within
        // output.count bytes; both outlive the call. It returns 0 when the stream does not fit.
        let n = libdeflate_deflate_compress(c, input.baseAddress, input.count, output.baseAddress, output.count)
        return n == 0 ? nil : n
    }

    private func zstdCluster(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) -> Int? {
        guard let ctx = zstd else { return nil }
        if ZSTD_isError(ZSTD_CCtx_reset(ctx, ZSTD_reset_session_only)) != 0 { return nil }
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        while true {
            let lastOut = outBuf.pos
            let r = ZSTD_compressStream2(ctx, &outBuf, &inBuf, ZSTD_e_end)
            if ZSTD_isError(r) != 0 { return nil }
            if r == 0 { return outBuf.pos }
            // More to flush but no room (or no progress): it does not fit.
            if outBuf.pos == outBuf.size || outBuf.pos == lastOut { return nil }
        }
    }
}

// MARK: - Whole-range allocation for callers that write the data themselves

/// A guest range given host clusters by `QCOW2Image.reserveForDirectWrite` but not yet mapped:
/// the caller writes the data at `hostOffset`, waits for the write to complete, then calls
/// `QCOW2Image.mapDirectWrite` so the L2 entries point at it.
public struct QCOW2DirectWrite: Sendable, Equatable {
    public var guestOffset: UInt64
    public var length: UInt64
    public var hostOffset: UInt64
}

extension QCOW2Image {
    /// Gives guest clusters [offset, offset + length) one contiguous run of new host clusters
    /// (refcount 1 each) and makes sure the L2 tables that will map them exist (allocated
    /// before the run, so they do not split it), but leaves the L2 entries as they are: the
    /// caller writes the data, and only once that write has completed calls `mapDirectWrite`.
    /// So no L2 entry, in memory or on disk, ever points at a cluster whose data is still in
    /// flight: a crash before the mapping leaks the clusters (refcount 1, no reference), which
    /// `check -r leaks` reclaims, and never exposes stale bytes.
    ///
    /// Only for fresh ranges: every cluster must be unallocated in this layer (no host cluster,
    /// not compressed); `offset` cluster-aligned; `length` a cluster multiple unless the range
    /// ends at the virtual size. Returns nil otherwise, and for images with an external data
    /// file (the caller then uses `write`, which handles every case). The caller must not
    /// reserve a range again (or write it another way) before mapping it.
    public func reserveForDirectWrite(at offset: UInt64, length: UInt64) throws -> QCOW2DirectWrite? {
        guard length > 0 else { return nil }
        let state = try writer()
        try checkRange(offset, length, "write")
        let cs = UInt64(clusterSize)
        guard !externalData, offset % cs == 0, length % cs == 0 || offset + length == virtualSize else { return nil }
        let end = (offset + length + cs - 1) / cs * cs
        let span = header.bytesPerL2Table
        var guest = offset
        while guest < end {
            if try l2TableOffset(forGuest: guest) == 0 {
                guest = min(end, (guest / span + 1) * span)
                continue
            }
            let entry = try l2Mapping(guest: guest).entry
            if entry.isCompressed || entry.hostOffset != 0 { return nil }
            guest += cs
        }
        var index = Int(offset / span)
        while UInt64(index) * span < end {
            _ = try writableL2(l1Index: index, state)
            index += 1
        }
        let host = try state.refcounts.allocate(count: (end - offset) / cs).offset
        return QCOW2DirectWrite(guestOffset: offset, length: length, hostOffset: host)
    }

    /// Points the L2 entries of a reserved range at its host clusters (COPIED: refcount 1).
    /// Call only after the data write to `reservation.hostOffset` has completed.
    public func mapDirectWrite(_ reservation: QCOW2DirectWrite) throws {
        let state = try writer()
        markBitmapsDirty(reservation.guestOffset, reservation.length)
        let cs = UInt64(clusterSize)
        let span = header.bytesPerL2Table
        let end = (reservation.guestOffset + reservation.length + cs - 1) / cs * cs
        var guest = reservation.guestOffset
        var target = reservation.hostOffset
        var table: UInt64 = 0
        var tableIndex = -1
        while guest < end {
            let index = Int(guest / span)
            if index != tableIndex {
                // Already ours (COPIED) since the reservation: no allocation happens here.
                table = try writableL2(l1Index: index, state)
                tableIndex = index
            }
            // The old entries hold no host cluster (checked when reserving): nothing to release.
            try setL2Entry(table: table, guest: guest, .standard(hostOffset: target, copied: true))
            guest += cs
            target += cs
        }
    }
}
