import DiskIO

/// Writes a new qcow2 image from validated parameters (ImageCreator does the option checks).
struct QCOW2CreateParameters: Equatable {
    enum Preallocation: String { case off, metadata, falloc, full }

    var path: String
    var size: UInt64
    var version: UInt32 = 3
    var clusterBits: Int = 16
    var refcountOrder: Int = 4
    var extendedL2 = false
    var lazyRefcounts = false
    var compressionType: UInt8 = 0
    var preallocation: Preallocation = .off
    var backingFile: String?
    var backingFormat: String?
    /// The external data file name as stored in the image and as created (relative to the
    /// current directory, as QEMU 7.2 does).
    var dataFile: String?
    var dataFileRaw = false
    /// The new files' cache mode (written buffered in any mode): unsafe (convert's create
    /// step) syncs nothing; the header is still written last.
    var cache: CacheMode = .writeback
}

enum QCOW2Create {
    /// The header a new image gets.
    static func header(for p: QCOW2CreateParameters, layout: QCOW2Layout) -> QCOW2Header {
        var h = QCOW2Header(version: p.version, clusterBits: UInt32(p.clusterBits), size: p.size)
        h.refcountOrder = UInt32(p.refcountOrder)
        h.refcountTableOffset = layout.refcountTableOffset
        h.refcountTableClusters = UInt32(layout.refcountTableClusters)
        h.l1Size = UInt32(layout.l1Entries)
        h.l1TableOffset = layout.l1Offset
        if p.lazyRefcounts { h.compatibleFeatures |= QCOW2Header.compatibleLazyRefcounts }
        if p.dataFile != nil {
            h.incompatibleFeatures |= QCOW2Header.incompatibleDataFile
            h.dataFileName = p.dataFile
        }
        if p.dataFileRaw { h.autoclearFeatures |= QCOW2Header.autoclearDataFileRaw }
        if p.compressionType != 0 {
            h.incompatibleFeatures |= QCOW2Header.incompatibleCompressionType
            h.compressionType = p.compressionType
        }
        if p.extendedL2 { h.incompatibleFeatures |= QCOW2Header.incompatibleExtendedL2 }
        h.backingFileName = p.backingFile
        h.backingFormat = p.backingFile != nil ? p.backingFormat : nil
        return h
    }

    static func layout(for p: QCOW2CreateParameters) throws(QCOW2Layout.Failure) -> QCOW2Layout {
        try QCOW2Layout(clusterBits: p.clusterBits, refcountOrder: p.refcountOrder, extendedL2: p.extendedL2,
                        size: p.size, preallocate: p.preallocation != .off, externalData: p.dataFile != nil)
    }

    /// Creates (or truncates) the image file and, if requested, the data file, and writes the
    /// whole image. The caller has validated `p` and computed `layout` with `layout(for:)`.
    /// Metadata is written in large writes: the refcount blocks in one, each L2 table in one.
    /// A device (image or data file) is written on, never truncated (QCOW2CreateDevice.swift).
    /// `created` records the regular files made, for the caller's cleanup on failure.
    static func write(_ p: QCOW2CreateParameters, layout: QCOW2Layout, created: CreatedFiles? = nil) throws {
        let header = header(for: p, layout: layout)
        let headerBytes = header.serialized()
        guard headerBytes.count <= layout.clusterSize else {
            throw ImageError(path: p.path, message: "Could not write qcow2 header: the header, its extensions and the backing file name need \(headerBytes.count) bytes, more than one \(layout.clusterSize)-byte cluster")
        }

        let file: DiskFile
        do {
            file = try DiskFile.create(p.path, cache: p.cache.buffered)
        } catch {
            throw ImageError(path: p.path, message: "Could not create the image file", cause: error)
        }
        defer { file.close() }
        created?.record(file)
        // The data file is created before anything is written, as QEMU creates both files
        // first: one that cannot be created (or is a device too small) then leaves nothing
        // written (and a failed create nothing but what the cleanup removes).
        var data: DiskFile?
        if let dataName = p.dataFile {
            do {
                data = try DiskFile.create(dataName, cache: p.cache.buffered)
            } catch {
                throw ImageError(path: p.path, message: "Could not create data file '\(dataName)'", cause: error)
            }
            created?.record(data!)
        }
        defer { data?.close() }
        let dataOnDevice = try data.map { data in try io(data.path) { try data.kind().isDevice } } ?? false
        if let data, dataOnDevice { try checkDataDevice(data, p) }
        let cs = UInt64(layout.clusterSize)
        let onDevice = try io(p.path) { try file.kind().isDevice }
        if onDevice { try prepareDevice(file, p, layout: layout) }

        try io(p.path) {
            // The header goes last (below): until then the file does not start with the qcow2
            // magic, so a process killed while creating leaves a file nothing takes for a
            // broken qcow2 image (its first cluster reads as zeros).
            try file.write(layout.refcountTableBytes(), at: layout.refcountTableOffset)
            try writeRefcountBlocks(file, layout: layout, path: p.path)
            if layout.l1Entries > 0 { try file.write(layout.l1Bytes(), at: layout.l1Offset) }
            if layout.preallocate {
                for t in 0..<layout.l2Count {
                    // A petabyte has two million tables: minutes of writing, so poll per table.
                    try Interruption.check(image: p.path, outcome: ZeroBuffer.newImageOutcome)
                    try file.write(layout.l2Bytes(t), at: layout.l2Offset(t))
                }
            }
            let length = layout.fileLength
            // A device keeps its size (prepareDevice checked that the layout fits on it).
            if !onDevice, try file.size() < length { try file.truncate(to: length) }
            if !layout.externalData && layout.l2Count > 0 {
                // Only the data clusters: the metadata between them is already written.
                for t in 0..<layout.l2Count {
                    let start = layout.l2Offset(t) + cs
                    let bytes = layout.dataClusters(inTable: t) * cs
                    switch p.preallocation {
                    case .falloc: try ZeroBuffer.allocate(in: file, at: start, length: bytes, image: p.path)
                    case .full: try ZeroBuffer.write(to: file, at: start, length: bytes, image: p.path)
                    default: break
                    }
                }
            }
            try file.sync()
            try writeHeader(headerBytes, to: file)
            try file.sync()
        }
        if onDevice { try checkReadsBack(file, path: p.path) }

        if let data {
            if dataOnDevice {
                try prepareDataDevice(data, p)
                return
            }
            try io(data.path) {
                switch p.preallocation {
                case .falloc: try ZeroBuffer.allocate(in: data, at: 0, length: p.size, image: p.path)
                case .full: try ZeroBuffer.write(to: data, at: 0, length: p.size, image: p.path)
                default: break
                }
                if try data.size() < p.size { try data.truncate(to: p.size) }
                try data.sync()
            }
        }
    }

    /// Writes the header (the rest of the first cluster already reads as zeros) so that the
    /// file turns into a qcow2 image in one step: a write within one page is never torn by a
    /// kill (the kernel only stops a write between pages), so the page holding the magic is
    /// written last, after any bytes of a header longer than a page.
    private static func writeHeader(_ bytes: [UInt8], to file: DiskFile) throws {
        let page = DiskFile.pageSize
        if bytes.count > page { try file.write(Array(bytes[page...]), at: UInt64(page)) }
        try file.write(Array(bytes.prefix(page)), at: 0)
    }

    /// Writes the refcount blocks in chunks of at most 8 MiB. Every chunk entirely below
    /// totalClusters has the same contents, so that one is built once and written again.
    private static func writeRefcountBlocks(_ file: DiskFile, layout: QCOW2Layout, path: String) throws {
        let cs = UInt64(layout.clusterSize)
        let chunkBlocks = max(1, (8 << 20) / cs)
        var fullChunk: [UInt8]?
        var block: UInt64 = 0
        while block < layout.refcountBlockCount {
            try Interruption.check(image: path, outcome: ZeroBuffer.newImageOutcome)
            let count = min(chunkBlocks, layout.refcountBlockCount - block)
            let isFull = count == chunkBlocks
                && (block + count) * layout.refcountsPerBlock <= layout.totalClusters
            let bytes: [UInt8]
            if isFull, let fullChunk {
                bytes = fullChunk
            } else {
                bytes = layout.refcountBlockBytes(first: block, count: count)
                if isFull { fullChunk = bytes }
            }
            try file.write(bytes, at: layout.refcountBlocksOffset + block * cs)
            block += count
        }
    }

    /// Runs `body`, turning an IOError into an ImageError about `path`.
    static func io<T>(_ path: String, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as IOError {
            throw ImageError(path: path, message: "Could not write the new image", cause: error)
        }
    }
}
