/// The qcow2 header (first cluster of the file): fixed fields, header extensions and the
/// backing file name, as docs/interop/qcow2.txt in QEMU defines them.
///
/// `parse` validates every field against the file size before anything trusts it;
/// `serialized()` (QCOW2HeaderExtensions.swift) lays the header out the way QEMU 7.2 does.
public struct QCOW2Header: Equatable, Sendable {
    public static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"
    /// QEMU's limits: 2 MiB clusters, 32 MiB L1 table, 8 MiB refcount table, 65536 snapshots.
    public static let minClusterBits: UInt32 = 9
    public static let maxClusterBits: UInt32 = 21
    public static let maxL1Bytes: UInt64 = 32 << 20
    public static let maxRefcountTableBytes: UInt64 = 8 << 20
    public static let maxSnapshots: UInt32 = 65536
    public static let maxBackingNameLength: UInt32 = 1023
    /// Bytes of the v3 header QEMU writes (104 plus compression_type and 7 bytes of padding).
    public static let v3HeaderLength: UInt32 = 112
    public static let v2HeaderLength: UInt32 = 72

    // Incompatible feature bits.
    public static let incompatibleDirty: UInt64 = 1 << 0
    public static let incompatibleCorrupt: UInt64 = 1 << 1
    public static let incompatibleDataFile: UInt64 = 1 << 2
    public static let incompatibleCompressionType: UInt64 = 1 << 3
    public static let incompatibleExtendedL2: UInt64 = 1 << 4
    public static let knownIncompatible: UInt64 = 0x1f
    // Compatible feature bits.
    public static let compatibleLazyRefcounts: UInt64 = 1 << 0
    // Autoclear feature bits.
    public static let autoclearBitmaps: UInt64 = 1 << 0
    public static let autoclearDataFileRaw: UInt64 = 1 << 1

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    /// Virtual disk size in bytes.
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var nbSnapshots: UInt32
    public var snapshotsOffset: UInt64
    // Version 3 fields (v2: zero features, refcount_order 4, header_length 72).
    public var incompatibleFeatures: UInt64
    public var compatibleFeatures: UInt64
    public var autoclearFeatures: UInt64
    public var refcountOrder: UInt32
    public var headerLength: UInt32
    /// 0 = zlib, 1 = zstd.
    public var compressionType: UInt8
    /// Header bytes past the 112 QEMU knows (header_length > 112), kept to be written back.
    public var unknownHeaderFields: [UInt8]

    // Header extensions.
    /// Backing file format name extension (0xe2792aca).
    public var backingFormat: String?
    /// External data file name extension (0x44415441).
    public var dataFileName: String?
    /// The feature name table (0x6803f857) as stored; `serialized()` writes QEMU's own table.
    public var featureNameTable: [QCOW2FeatureName]
    /// The bitmaps extension (0x23852875) data, kept verbatim (24 bytes).
    public var bitmapsExtension: [UInt8]?
    /// Extensions simg does not interpret, in file order, written back unchanged.
    public var unknownExtensions: [QCOW2HeaderExtension]

    /// The backing file name (stored at backing_file_offset, not NUL-terminated).
    public var backingFileName: String?

    /// A v3 (or v2 with `version: 2`) header with nothing allocated; the create path fills in
    /// the offsets. Features default to none, refcount_order 4 (16-bit refcounts).
    public init(version: UInt32 = 3, clusterBits: UInt32 = 16, size: UInt64 = 0) {
        self.version = version
        self.backingFileOffset = 0
        self.backingFileSize = 0
        self.clusterBits = clusterBits
        self.size = size
        self.cryptMethod = 0
        self.l1Size = 0
        self.l1TableOffset = 0
        self.refcountTableOffset = 0
        self.refcountTableClusters = 0
        self.nbSnapshots = 0
        self.snapshotsOffset = 0
        self.incompatibleFeatures = 0
        self.compatibleFeatures = 0
        self.autoclearFeatures = 0
        self.refcountOrder = 4
        self.headerLength = version >= 3 ? QCOW2Header.v3HeaderLength : QCOW2Header.v2HeaderLength
        self.compressionType = 0
        self.unknownHeaderFields = []
        self.featureNameTable = []
        self.unknownExtensions = []
    }

    // MARK: - Derived values

    public var clusterSize: Int { 1 << Int(clusterBits) }
    public var refcountBits: Int { 1 << Int(refcountOrder) }
    public var hasExtendedL2: Bool { incompatibleFeatures & QCOW2Header.incompatibleExtendedL2 != 0 }
    public var hasDataFile: Bool { incompatibleFeatures & QCOW2Header.incompatibleDataFile != 0 }
    public var isDataFileRaw: Bool { autoclearFeatures & QCOW2Header.autoclearDataFileRaw != 0 }
    public var isDirty: Bool { incompatibleFeatures & QCOW2Header.incompatibleDirty != 0 }
    public var isCorrupt: Bool { incompatibleFeatures & QCOW2Header.incompatibleCorrupt != 0 }
    public var hasLazyRefcounts: Bool { compatibleFeatures & QCOW2Header.compatibleLazyRefcounts != 0 }
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    public var l2EntrySize: Int { hasExtendedL2 ? 16 : 8 }
    /// Guest clusters one L2 table maps.
    public var l2Entries: Int { clusterSize / l2EntrySize }
    /// Subclusters per cluster: 32 with extended L2 entries, else 1.
    public var subclustersPerCluster: Int { hasExtendedL2 ? 32 : 1 }
    public var subclusterSize: Int { clusterSize / subclustersPerCluster }
    /// Refcount entries in one refcount block.
    public var refcountBlockEntries: Int { clusterSize * 8 / refcountBits }
    /// Guest bytes one L1 entry (one L2 table) covers.
    public var bytesPerL2Table: UInt64 { UInt64(l2Entries) << UInt64(clusterBits) }
    /// L1 entries needed to map `size` bytes (what QEMU calls size_to_l1).
    public static func l1EntriesNeeded(size: UInt64, clusterBits: UInt32, extendedL2: Bool) -> UInt64 {
        let shift = UInt64(clusterBits) + UInt64(clusterBits) - (extendedL2 ? 4 : 3)
        let perTable: UInt64 = 1 << shift
        return size / perTable + (size % perTable == 0 ? 0 : 1)
    }
    public var l1EntriesNeeded: UInt64 {
        QCOW2Header.l1EntriesNeeded(size: size, clusterBits: clusterBits, extendedL2: hasExtendedL2)
    }

    // MARK: - Parsing

    /// Parses and validates a header. `bytes` must hold the first cluster of the file (or the
    /// whole file when shorter; missing bytes read as zero); at least 72 bytes are needed.
    public static func parse(_ bytes: [UInt8], fileSize: UInt64, path: String) throws -> QCOW2Header {
        func fail(_ message: String) -> ImageError { ImageError(path: path, message: message) }
        guard bytes.count >= 72 else {
            throw fail("Image is not in qcow2 format")
        }
        // QEMU's exact words (the magic is the only thing checked here).
        guard QCOW2BE.u32(bytes, 0) == magic else { throw fail("Image is not in qcow2 format") }
        var h = QCOW2Header()
        h.version = QCOW2BE.u32(bytes, 4)
        guard h.version == 2 || h.version == 3 else {
            throw fail("Unsupported qcow2 version \(h.version) (field 'version' must be 2 or 3)")
        }
        h.backingFileOffset = QCOW2BE.u64(bytes, 8)
        h.backingFileSize = QCOW2BE.u32(bytes, 16)
        h.clusterBits = QCOW2BE.u32(bytes, 20)
        guard (minClusterBits...maxClusterBits).contains(h.clusterBits) else {
            throw fail("Unsupported cluster size: 2^\(h.clusterBits) (field 'cluster_bits' must be 9 to 21)")
        }
        let clusterSize = UInt64(1) << UInt64(h.clusterBits)
        guard bytes.count >= Int(min(clusterSize, 72 + 40)) else {
            throw fail("header buffer shorter than needed")
        }
        h.size = QCOW2BE.u64(bytes, 24)
        h.cryptMethod = QCOW2BE.u32(bytes, 32)
        h.l1Size = QCOW2BE.u32(bytes, 36)
        h.l1TableOffset = QCOW2BE.u64(bytes, 40)
        h.refcountTableOffset = QCOW2BE.u64(bytes, 48)
        h.refcountTableClusters = QCOW2BE.u32(bytes, 56)
        h.nbSnapshots = QCOW2BE.u32(bytes, 60)
        h.snapshotsOffset = QCOW2BE.u64(bytes, 64)

        if h.version == 2 {
            h.incompatibleFeatures = 0
            h.compatibleFeatures = 0
            h.autoclearFeatures = 0
            h.refcountOrder = 4
            h.headerLength = v2HeaderLength
            h.compressionType = 0
        } else {
            guard bytes.count >= 104 else { throw fail("header buffer shorter than needed") }
            h.incompatibleFeatures = QCOW2BE.u64(bytes, 72)
            h.compatibleFeatures = QCOW2BE.u64(bytes, 80)
            h.autoclearFeatures = QCOW2BE.u64(bytes, 88)
            h.refcountOrder = QCOW2BE.u32(bytes, 96)
            h.headerLength = QCOW2BE.u32(bytes, 100)
            guard h.headerLength >= 104 else {
                throw fail("qcow2 header too short (field 'header_length' is \(h.headerLength), at least 104 needed)")
            }
            guard h.headerLength % 8 == 0 else {
                throw fail("Invalid qcow2 header length (field 'header_length' \(h.headerLength) is not a multiple of 8)")
            }
            guard UInt64(h.headerLength) <= clusterSize, Int(h.headerLength) <= bytes.count else {
                throw fail("qcow2 header exceeds cluster size (field 'header_length' is \(h.headerLength))")
            }
            h.compressionType = h.headerLength > 104 ? bytes[104] : 0
            if h.headerLength > v3HeaderLength {
                h.unknownHeaderFields = Array(bytes[Int(v3HeaderLength)..<Int(h.headerLength)])
            }
        }

        // Extensions live between the header and the backing file name (or the cluster end).
        var extensionsEnd = clusterSize
        if h.backingFileOffset != 0 {
            guard h.backingFileOffset <= clusterSize else {
                throw fail("Invalid backing file offset (field 'backing_file_offset' \(QCOW2BE.hex(h.backingFileOffset)) is past the first cluster)")
            }
            extensionsEnd = h.backingFileOffset
        }
        try parseExtensions(bytes, from: Int(h.headerLength), to: Int(extensionsEnd), into: &h, path: path)

        if h.version == 3 {
            let unknown = h.incompatibleFeatures & ~knownIncompatible
            if unknown != 0 {
                throw fail("Unsupported qcow2 feature(s): \(h.describeUnsupported(unknown)) (field 'incompatible_features')")
            }
        }
        guard h.cryptMethod == 0 else {
            guard h.cryptMethod <= 2 else {
                throw fail("Unsupported encryption method \(h.cryptMethod) (field 'crypt_method')")
            }
            let kind = h.cryptMethod == 1 ? "AES" : "LUKS"
            throw fail("encrypted images are not supported (field 'crypt_method' is \(h.cryptMethod): \(kind))")
        }
        guard h.refcountOrder <= 6 else {
            throw fail("Reference count entry width too large; may not exceed 64 bits (field 'refcount_order' is \(h.refcountOrder), at most 6)")
        }
        if h.incompatibleFeatures & incompatibleCompressionType != 0 {
            guard h.compressionType != 0 else {
                throw fail("Invalid compression type (field 'compression_type' must be non-zero when the compression type feature bit is set)")
            }
        } else if h.compressionType != 0 {
            throw fail("Invalid compression type (field 'compression_type' is \(h.compressionType) but the compression type feature bit is not set)")
        }
        guard h.compressionType <= 1 else {
            throw fail("Unknown compression type \(h.compressionType) (field 'compression_type')")
        }
        if h.hasExtendedL2 && h.clusterBits < 14 {
            throw fail("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes (field 'cluster_bits' is \(h.clusterBits))")
        }
        if h.isDataFileRaw && !h.hasDataFile {
            throw fail("data-file-raw requires a data file (field 'autoclear_features')")
        }

        // Size and L1 table.
        let needed = h.l1EntriesNeeded
        guard needed <= UInt64(Int32.max) else {
            throw fail("Image is too big (field 'size' \(h.size))")
        }
        guard UInt64(h.l1Size) * 8 <= maxL1Bytes else {
            throw fail("Active L1 table too large (field 'l1_size' \(h.l1Size) entries, at most \(maxL1Bytes / 8))")
        }
        guard UInt64(h.l1Size) >= needed else {
            throw fail("L1 table is too small for the virtual size (field 'l1_size' \(h.l1Size), \(needed) needed for size \(h.size))")
        }
        try checkTable(offset: h.l1TableOffset, bytes: UInt64(h.l1Size) * 8, field: "l1_table_offset",
                       sentence: "Active L1 table offset invalid", clusterSize: clusterSize, fileSize: fileSize, path: path)

        // Refcount table.
        guard h.refcountTableClusters > 0 else {
            throw fail("Invalid reference count table (field 'refcount_table_clusters' is 0)")
        }
        let refcountTableBytes = UInt64(h.refcountTableClusters) << UInt64(h.clusterBits)
        guard refcountTableBytes <= maxRefcountTableBytes else {
            throw fail("Reference count table too large (field 'refcount_table_clusters' \(h.refcountTableClusters))")
        }
        try checkTable(offset: h.refcountTableOffset, bytes: refcountTableBytes, field: "refcount_table_offset",
                       sentence: "Invalid reference count table offset", clusterSize: clusterSize, fileSize: fileSize, path: path)

        // Snapshot table (each entry is at least 40 bytes).
        guard h.nbSnapshots <= maxSnapshots else {
            throw ImageError(.snapshotTable, path: path,
                             message: "Snapshot table too large (field 'nb_snapshots' \(h.nbSnapshots), at most \(maxSnapshots))")
        }
        if h.nbSnapshots > 0 {
            try checkTable(offset: h.snapshotsOffset, bytes: UInt64(h.nbSnapshots) * 40, field: "snapshots_offset",
                           sentence: "Invalid snapshot table offset", clusterSize: clusterSize, fileSize: fileSize, path: path,
                           kind: .snapshotTable)
        } else if h.snapshotsOffset % clusterSize != 0 {
            throw ImageError(.snapshotTable, path: path,
                             message: "Invalid snapshot table offset (field 'snapshots_offset' \(QCOW2BE.hex(h.snapshotsOffset)) is not cluster-aligned)")
        }

        // Backing file name.
        if h.backingFileOffset != 0 {
            guard h.backingFileSize <= maxBackingNameLength else {
                throw fail("Backing file name too long (field 'backing_file_size' \(h.backingFileSize), at most 1023)")
            }
            let end = h.backingFileOffset + UInt64(h.backingFileSize)
            guard end <= clusterSize, end <= UInt64(bytes.count) else {
                throw fail("Invalid backing file offset (fields 'backing_file_offset' \(QCOW2BE.hex(h.backingFileOffset)) and 'backing_file_size' \(h.backingFileSize) run past the first cluster)")
            }
            guard h.backingFileSize > 0 else {
                throw fail("Invalid backing file name (field 'backing_file_size' is 0 but 'backing_file_offset' is set)")
            }
            h.backingFileName = QCOW2BE.string(bytes[Int(h.backingFileOffset)..<Int(end)])
            if h.isDataFileRaw {
                throw fail("data-file-raw cannot be used with a backing file (field 'autoclear_features')")
            }
        }
        if h.hasDataFile && h.dataFileName == nil {
            throw fail("'data-file' is required for this image (field 'incompatible_features' has the external data file bit, and there is no data file name extension)")
        }
        return h
    }

    /// Checks that a table is cluster-aligned and lies inside the file. `sentence` is QEMU's
    /// wording; the field and the numbers follow in parentheses. `kind` is the error's.
    private static func checkTable(offset: UInt64, bytes: UInt64, field: String, sentence: String,
                                   clusterSize: UInt64, fileSize: UInt64, path: String,
                                   kind: ImageError.Kind = .general) throws {
        guard offset % clusterSize == 0 else {
            throw ImageError(kind, path: path, message: "\(sentence) (field '\(field)' \(QCOW2BE.hex(offset)) is not cluster-aligned)")
        }
        guard bytes > 0 else { return }
        let (end, overflow) = offset.addingReportingOverflow(bytes)
        guard !overflow, offset != 0, end <= fileSize else {
            throw ImageError(kind, path: path, message: "\(sentence) (field '\(field)' \(QCOW2BE.hex(offset)), \(bytes) bytes, is outside the file of \(fileSize) bytes)")
        }
    }

    /// Unsupported incompatible feature bits as QEMU lists them: names from the image's
    /// feature name table, then "Unknown incompatible feature: <hex>" for bits it lacks.
    func describeUnsupported(_ bits: UInt64) -> String {
        var parts: [String] = []
        var unnamed: UInt64 = 0
        for bit in 0..<64 where bits & (UInt64(1) << UInt64(bit)) != 0 {
            if let entry = featureNameTable.first(where: { $0.type == 0 && Int($0.bit) == bit }) {
                parts.append(entry.name)
            } else {
                unnamed |= UInt64(1) << UInt64(bit)
            }
        }
        if unnamed != 0 { parts.append("Unknown incompatible feature: " + String(unnamed, radix: 16)) }
        return parts.joined(separator: ", ")
    }
}
