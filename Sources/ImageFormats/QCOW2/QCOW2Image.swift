import DiskIO

/// An open qcow2 image: header, active L1 table, L2 table cache, and the read path.
///
/// Members the write path (QCOW2Image+Write.swift) builds on:
/// - `header` (var): the parsed header; after changing it, write `header.serialized()`.
/// - `l1` (var): the active L1 table as decoded entries (`QCOW2L1Entry(raw:)`); its on-disk
///   copy is at `header.l1TableOffset`.
/// - `tableCache`: L2 tables (and, if the writer wants, refcount blocks) by host offset,
///   write-back with `beforeWriteback`.
/// - `l2Table(at:)`, `l2TableOffset(forGuest:)`, `lookup(at:maxLength:)`, `classify(...)`
///   (QCOW2ClusterMap.swift), `clusterSize`, `granuleSize`.
/// - `writeState`: free for the writer's refcount/allocator state.
/// - `compression`: the image's codec (`compress(_:limit:)` for compressed writes);
///   `snapshots`: the parsed snapshot table (`QCOW2Snapshot.serialized()` writes an entry).
/// - `invalidateDecompressedCache()`: call after changing a compressed cluster's mapping.
/// - `DiskFile.qcow2Read/qcow2ReadBytes/qcow2Write` (QCOW2HostIO.swift): host I/O that also
///   works on O_DIRECT files (bounce buffers for unaligned metadata).
/// - `virtualSize` is `header.size` rounded down to 512 bytes (QEMU's view); resizing means
///   changing `header.size` (and the L1 table) and rewriting the header.
public final class QCOW2Image: DiskImage {
    public let path: String
    /// What info calls the image (QEMU's bs->filename): see ImageLocation.displayName.
    public var displayName: String
    /// The qcow2 file (metadata, and data unless there is an external data file).
    public let file: DiskFile
    /// Where guest clusters live: the external data file, or `file`.
    public let dataFile: DiskFile
    /// The qcow2 file, and its external data file when there is one.
    public var files: [DiskFile] { dataFile === file ? [file] : [file, dataFile] }
    public let isWritable: Bool
    public var format: ImageFormat { .qcow2 }
    /// The header's size rounded down to whole 512-byte sectors, as QEMU sees it.
    public var virtualSize: UInt64 { header.size & ~511 }
    /// The opened backing image; set by `ImageOpener` (or the caller) after opening.
    public var backing: (any DiskImage)?

    public var backingReference: BackingReference? {
        header.backingFileName.map { BackingReference(name: $0, format: header.backingFormat) }
    }

    public func attachBacking(_ image: any DiskImage) { backing = image }

    var header: QCOW2Header
    /// The active L1 table (decoded entries).
    var l1: [UInt64]
    var tableCache: QCOW2TableCache
    var snapshots: [QCOW2Snapshot]
    let compression: QCOW2Compression
    /// For the write helper's refcount/allocator state.
    var writeState: AnyObject?
    /// The persistent bitmaps kept through writes (QCOW2Image+BitmapTracking.swift); nil
    /// until the first write, and for images without bitmaps.
    var bitmapTracker: QCOW2BitmapEditor?
    /// Whether the image looks preallocated with metadata (QEMU's
    /// qcow2_detect_metadata_preallocation), found at the first `layerStatus`; nil until then.
    var metadataPreallocation: Bool?
    /// Which cluster `clusterBuffer` holds decompressed, keyed by guest cluster and descriptor
    /// (so a remapped cluster never hits a stale entry); nil when none.
    private var decompressedKey: (cluster: UInt64, descriptor: QCOW2CompressedDescriptor)?
    private var clusterBuffer: [UInt8] = []
    private var compressedInput: [UInt8] = []
    /// The codec contexts for `readCompressed`, made at the first compressed cluster and reused.
    private var decompressor: QCOW2Decompressor?
    private var closed = false
    /// The qcow2 file's size when opened read-only (nothing can grow it through us), so
    /// metadata tables past its end are refused; `.max` for writable images, whose tables may
    /// be newly allocated past the end and still only in the cache.
    var readOnlyFileSize: UInt64 = .max

    public var clusterSize: Int { header.clusterSize }
    /// The header as parsed (read-only view for the CLI and tests).
    public var qcow2Header: QCOW2Header { header }

    init(path: String, file: DiskFile, dataFile: DiskFile, header: QCOW2Header, l1: [UInt64],
         snapshots: [QCOW2Snapshot], writable: Bool) {
        self.path = path
        self.displayName = file.path
        self.file = file
        self.dataFile = dataFile
        self.header = header
        self.l1 = l1
        self.snapshots = snapshots
        self.isWritable = writable
        self.compression = QCOW2Compression(rawValue: header.compressionType) ?? .zlib
        self.tableCache = QCOW2TableCache(file: file, tableSize: header.clusterSize)
    }

    /// Opens a qcow2 image (without its backing file: see `ImageOpener`).
    /// The external data file, if any, is opened by the name stored in the image, relative to
    /// the current directory as QEMU 7.2 does (not to the image's folder).
    ///
    /// `cache`: the image file's and the data file's cache mode (O_DIRECT for none and
    /// directsync; unsafe, QEMU's cache.no-flush and convert's default target mode, never
    /// syncs, anywhere in the write path; the order of the metadata writes, which is what
    /// makes a kill harmless, is unchanged).
    public static func open(path: String, writable: Bool = false, cache: CacheMode = .writeback) throws -> QCOW2Image {
        try open(location: ImageLocation(name: path, path: path), writable: writable, cache: cache)
    }

    /// Opens the file `location` names; errors name the image by the name it was given
    /// (`location.name`), system-call errors the file.
    public static func open(location: ImageLocation, writable: Bool = false, cache: CacheMode = .writeback) throws -> QCOW2Image {
        let file = try DiskFile.open(location.path, access: writable ? .readWrite : .readOnly, cache: cache)
        do {
            return try open(file: file, location: location, header: nil, writable: writable)
        } catch {
            file.close()
            throw error
        }
    }

    /// Opens the image on `file`, already open as `location.path`; `header`, the file's first
    /// bytes as the probe read them (zero-padded), is not read again. On success the image
    /// owns `file`; on failure the caller still owns it.
    static func open(file: DiskFile, location: ImageLocation, header: [UInt8]?, writable: Bool) throws -> QCOW2Image {
        let image = try open(path: location.name, file: file, writable: writable, header: header)
        image.displayName = location.displayName
        return image
    }

    /// Opens a qcow2 image on an already open file. On success the image owns `file` (closes
    /// it in `close()`); on failure the caller still owns it. An external data file is opened
    /// in the image file's cache mode. `header`: the file's first bytes, zero-padded past its
    /// end, if the caller has read them already.
    public static func open(path: String, file: DiskFile, writable: Bool, header: [UInt8]? = nil) throws -> QCOW2Image {
        let fileSize = try file.size()
        let known = header ?? []
        // The first 112 bytes tell the cluster size; the header is the whole first cluster.
        let start = known.count >= 112 ? Array(known.prefix(112)) : try file.qcow2ReadBytes(count: 112, at: 0)
        let bits = QCOW2BE.u32(start, 20)
        var bytes = start
        if QCOW2BE.u32(start, 0) == QCOW2Header.magic,
           (QCOW2Header.minClusterBits...QCOW2Header.maxClusterBits).contains(bits) {
            let clusterSize = 1 << Int(bits)
            if known.count >= clusterSize {
                bytes = Array(known.prefix(clusterSize))
            } else if known.count >= 112 {
                // Only the rest of the cluster is read.
                bytes = known + (try file.qcow2ReadBytes(count: clusterSize - known.count, at: UInt64(known.count)))
            } else {
                bytes = try file.qcow2ReadBytes(count: clusterSize, at: 0)
            }
        }
        let header = try QCOW2Header.parse(bytes, fileSize: fileSize, path: path)
        if writable && header.isCorrupt {
            throw ImageError(path: path, message: "qcow2: Image is corrupt; cannot be opened read/write")
        }

        let l1Bytes = try file.qcow2ReadBytes(count: Int(header.l1Size) * 8, at: header.l1TableOffset)
        let l1 = QCOW2BE.words(l1Bytes)
        let snapshots = try QCOW2Snapshot.readTable(file: file, header: header, fileSize: fileSize, path: path)

        var dataFile = file
        if header.hasDataFile, let name = header.dataFileName {
            do {
                dataFile = try DiskFile.open(name, access: writable ? .readWrite : .readOnly, cache: file.cache)
            } catch {
                throw ImageError(.dataFileOpen, path: path, message: "Could not open data file '\(name)'", cause: error)
            }
        }
        let image = QCOW2Image(path: path, file: file, dataFile: dataFile, header: header, l1: l1,
                               snapshots: snapshots, writable: writable)
        if !writable { image.readOnlyFileSize = fileSize }
        // QEMU reads the bitmap directory (and the tables of the bitmaps not in use) when it
        // opens the image and refuses a broken one, with these words.
        do {
            _ = try QCOW2BitmapDirectory.validate(file: file, header: header, virtualSize: image.virtualSize, path: path)
        } catch {
            if dataFile !== file { dataFile.close() }
            throw error
        }
        return image
    }

    // MARK: - Reading

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let count = UInt64(buffer.count)
        guard count > 0 else { return }
        let (end, overflow) = offset.addingReportingOverflow(count)
        guard !overflow, end <= virtualSize else {
            throw ImageError(path: path, message: "read of \(count) bytes at offset \(offset) is past the end of the image (virtual size \(virtualSize))")
        }
        var done: UInt64 = 0
        while done < count {
            let position = offset + done
            let run = try lookup(at: position, maxLength: count - done)
            let n = Int(run.length)
            // Sound: done + n <= count == buffer.count (lookup never exceeds maxLength).
            let part = UnsafeMutableRawBufferPointer(start: buffer.baseAddress! + Int(done), count: n)
            switch run.kind {
            case .normal(let host):
                try dataFile.qcow2Read(into: part, at: host)
            case .zero:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                try readBacking(into: part, at: position)
            case .compressed(let descriptor):
                try readCompressed(into: part, guestOffset: position, descriptor)
            }
            done += UInt64(n)
        }
    }

    /// Unallocated ranges: the backing file's data where it reaches, zeros past its end or
    /// without one. A backing file named in the header but not opened reads as zeros.
    private func readBacking(into part: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var filled = 0
        if let backing, offset < backing.virtualSize {
            filled = Int(min(UInt64(part.count), backing.virtualSize - offset))
            // Sound: filled <= part.count.
            try backing.read(into: UnsafeMutableRawBufferPointer(start: part.baseAddress!, count: filled), at: offset)
        }
        if filled < part.count {
            UnsafeMutableRawBufferPointer(start: part.baseAddress! + filled, count: part.count - filled)
                .initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Copies guest bytes at `guestOffset` (inside one compressed cluster) into `part`. The
    /// last decompressed cluster stays in `clusterBuffer`, so small sequential reads do not
    /// decompress it again; the input and output buffers are reused, not allocated per cluster.
    private func readCompressed(into part: UnsafeMutableRawBufferPointer, guestOffset: UInt64,
                                _ d: QCOW2CompressedDescriptor) throws {
        let cluster = guestOffset / UInt64(clusterSize)
        if decompressedKey?.cluster != cluster || decompressedKey?.descriptor != d {
            decompressedKey = nil
            let n = Int(d.byteLength)  // at most 2^13 sectors: 4 MiB
            if compressedInput.count < n { compressedInput = [UInt8](repeating: 0, count: n) }
            if clusterBuffer.count != clusterSize { clusterBuffer = [UInt8](repeating: 0, count: clusterSize) }
            try compressedInput.withUnsafeMutableBytes {
                _ = try file.qcow2Read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: d.hostOffset)
            }
            if decompressor == nil { decompressor = try QCOW2Decompressor(codec: compression) }
            let codec = decompressor!
            let ok = compressedInput.withUnsafeBytes { src in
                clusterBuffer.withUnsafeMutableBytes {
                    codec.decompress(UnsafeRawBufferPointer(rebasing: src[0..<n]), into: $0)
                }
            }
            guard ok else {
                throw ImageError(path: path, message: "could not decompress the \(compression.name) cluster at guest offset \(cluster * UInt64(clusterSize)) (host offset \(QCOW2BE.hex(d.hostOffset)), \(d.byteLength) bytes): invalid compressed data")
            }
            decompressedKey = (cluster, d)
        }
        let within = Int(guestOffset % UInt64(clusterSize))
        clusterBuffer.withUnsafeBytes { src in
            // Sound: lookup keeps a compressed run inside one cluster, so within + part.count <= clusterSize.
            part.baseAddress!.copyMemory(from: src.baseAddress! + within, byteCount: part.count)
        }
    }

    /// Forgets the cached decompressed cluster (the write path calls this when it remaps).
    func invalidateDecompressedCache() { decompressedKey = nil }

    // MARK: - Block status

    /// See `DiskImage.blockStatus`. Unallocated ranges are `.backing` while a backing file
    /// covers them (clipped at the opened backing file's size, `.hole` beyond it); when the
    /// header names a backing file that was not opened they are `.backing` throughout.
    /// Allocated zero clusters are `.zero` even when preallocated.
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
        guard length > 0, offset < virtualSize else {
            throw ImageError(path: path, message: "block status of \(length) bytes at offset \(offset) is outside the image (virtual size \(virtualSize))")
        }
        let limit = min(length, virtualSize - offset)
        var run = try lookup(at: offset, maxLength: limit)
        // The compressed bytes of the run so far (`lookup` gives one compressed cluster a run).
        var compressed: Extent.Kind?
        if case .compressed(let d) = run.kind {
            compressed = .compressed(hostOffset: d.hostOffset, length: Int(d.byteLength))
        }
        // Keep merging across L2 tables while the kind continues.
        while run.length < limit {
            let next = try lookup(at: offset + run.length, maxLength: limit - run.length)
            switch (run.kind, next.kind) {
            case (.unallocated, .unallocated), (.zero, .zero):
                run.length += next.length
                continue
            case (.compressed, .compressed(let d)):
                // Consecutive compressed clusters make one extent while they are packed one
                // after another on the host (callers read them through read(into:at:), which
                // looks up each cluster's descriptor).
                guard let joined = compressed?.joiningCompressed(
                    .compressed(hostOffset: d.hostOffset, length: Int(d.byteLength))) else { break }
                compressed = joined
                run.length += next.length
                continue
            case (.normal(let a), .normal(let b)) where b == a + run.length:
                run.length += next.length
                continue
            default:
                break
            }
            break
        }
        var kind: Extent.Kind
        var extentLength = run.length
        switch run.kind {
        case .normal(let host): kind = .data(hostOffset: host)
        case .compressed(let d): kind = compressed ?? .compressed(hostOffset: d.hostOffset, length: Int(d.byteLength))
        case .zero: kind = .zero
        case .unallocated:
            if let backing {
                if offset >= backing.virtualSize {
                    kind = .hole
                } else {
                    kind = .backing
                    extentLength = min(extentLength, backing.virtualSize - offset)
                }
            } else {
                kind = header.backingFileName != nil ? .backing : .hole
            }
        }
        return Extent(offset: offset, length: extentLength, kind: kind)
    }

    // MARK: - Closing

    public func close() throws {
        guard !closed else { return }
        closed = true
        var firstError: (any Error)?
        if isWritable {
            do { try flush() } catch { firstError = error }
            // Only over a complete flush: otherwise the bitmaps stay in use (inconsistent).
            if firstError == nil {
                do { try storeBitmaps() } catch { firstError = error }
            }
        }
        if let backing {
            do { try backing.close() } catch { if firstError == nil { firstError = error } }
        }
        if dataFile !== file { dataFile.close() }
        file.close()
        if let firstError { throw firstError }
    }
}
