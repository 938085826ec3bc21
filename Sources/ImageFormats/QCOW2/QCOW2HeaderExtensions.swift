import DiskIO
/// Header extensions and header serialization.

/// One header extension simg does not interpret: written back as it was read.
public struct QCOW2HeaderExtension: Equatable, Sendable {
    public var type: UInt32
    public var data: [UInt8]

    public init(type: UInt32, data: [UInt8]) {
        self.type = type
        self.data = data
    }
}

/// One entry of the feature name table extension.
public struct QCOW2FeatureName: Equatable, Sendable {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    public var type: UInt8
    public var bit: UInt8
    public var name: String

    public init(type: UInt8, bit: UInt8, name: String) {
        self.type = type
        self.bit = bit
        self.name = name
    }
}

extension QCOW2Header {
    public static let extensionEnd: UInt32 = 0
    public static let extensionBackingFormat: UInt32 = 0xe279_2aca
    public static let extensionFeatureTable: UInt32 = 0x6803_f857
    public static let extensionBitmaps: UInt32 = 0x2385_2875
    public static let extensionCrypto: UInt32 = 0x0537_be77
    public static let extensionDataFile: UInt32 = 0x4441_5441

    /// The feature name table QEMU 7.2 writes into every v3 image with clusters above 4 KiB.
    public static let qemuFeatureTable: [QCOW2FeatureName] = [
        QCOW2FeatureName(type: 0, bit: 0, name: "dirty bit"),
        QCOW2FeatureName(type: 0, bit: 1, name: "corrupt bit"),
        QCOW2FeatureName(type: 0, bit: 2, name: "external data file"),
        QCOW2FeatureName(type: 0, bit: 3, name: "compression type"),
        QCOW2FeatureName(type: 0, bit: 4, name: "extended L2 entries"),
        QCOW2FeatureName(type: 1, bit: 0, name: "lazy refcounts"),
        QCOW2FeatureName(type: 2, bit: 0, name: "bitmaps"),
        QCOW2FeatureName(type: 2, bit: 1, name: "raw external data"),
    ]

    /// Reads the extension area [from, to) of the header cluster.
    static func parseExtensions(_ bytes: [UInt8], from start: Int, to limit: Int,
                                into h: inout QCOW2Header, path: String) throws {
        let end = min(limit, bytes.count)
        var offset = start
        while offset + 8 <= end {
            let type = QCOW2BE.u32(bytes, offset)
            let length = Int(QCOW2BE.u32(bytes, offset + 4))
            offset += 8
            if type == extensionEnd { return }
            guard length <= end - offset else {
                throw ImageError(path: path, message: "Header extension too large (extension \(QCOW2BE.hex(UInt64(type))): length \(length) at offset \(offset - 8) runs past the header area ending at \(end))")
            }
            let data = Array(bytes[offset..<offset + length])
            // Known extensions that appear twice: the last one wins, as in QEMU.
            if type != extensionFeatureTable && type != extensionBackingFormat && type != extensionDataFile
                && type != extensionBitmaps && type != extensionCrypto {
                h.unknownExtensions.append(QCOW2HeaderExtension(type: type, data: data))
            }
            switch type {
            case extensionBackingFormat:
                h.backingFormat = QCOW2BE.string(data[...])
            case extensionDataFile:
                h.dataFileName = QCOW2BE.string(data[...])
            case extensionFeatureTable:
                // Whole entries only; QEMU ignores a partial one too.
                for i in stride(from: 0, to: length - length % 48, by: 48) {
                    var nameBytes = data[(i + 2)..<(i + 48)]
                    if let nul = nameBytes.firstIndex(of: 0) { nameBytes = nameBytes[..<nul] }
                    h.featureNameTable.append(QCOW2FeatureName(type: data[i], bit: data[i + 1],
                                                               name: QCOW2BE.string(nameBytes)))
                }
            case extensionBitmaps:
                guard length == 24 else {
                    throw ImageError(path: path, message: "bitmaps_ext: Invalid extension length (\(length), expected 24)")
                }
                // QEMU refuses to open an image whose consistent bitmaps extension is out of
                // range (with the bit clear the bitmaps are stale and the fields ignored).
                if h.autoclearFeatures & autoclearBitmaps != 0 {
                    try checkBitmapsExtension(data, clusterSize: UInt64(1) << UInt64(h.clusterBits), path: path)
                }
                h.bitmapsExtension = data
            case extensionCrypto:
                // Only present with LUKS encryption, which parse refuses anyway.
                h.unknownExtensions.append(QCOW2HeaderExtension(type: type, data: data))
            default:
                break
            }
            // Each extension's data is padded to a multiple of 8.
            let padded = (length + 7) & ~7
            offset += min(padded, end - offset)
        }
        // Running out of room without an end marker: QEMU treats this as the end too.
    }

    /// QEMU's limits on the bitmaps extension: 65535 bitmaps, a directory of at most 1 KiB
    /// per bitmap, cluster-aligned; its words, then the field and value.
    static func checkBitmapsExtension(_ data: [UInt8], clusterSize: UInt64, path: String) throws {
        func fail(_ message: String) -> ImageError { ImageError(path: path, message: message) }
        let count = QCOW2BE.u32(data, 0)
        let reserved = QCOW2BE.u32(data, 4)
        let size = QCOW2BE.u64(data, 8)
        let offset = QCOW2BE.u64(data, 16)
        guard reserved == 0 else {
            throw fail("bitmaps_ext: Reserved field is not zero (\(reserved))")
        }
        guard count <= 65535 else {
            throw fail("bitmaps_ext: Image has \(count) bitmaps, exceeding the QEMU supported maximum of 65535")
        }
        guard count > 0 else { throw fail("found bitmaps extension with zero bitmaps") }
        guard offset % clusterSize == 0 else {
            throw fail("bitmaps_ext: invalid bitmap directory offset (\(QCOW2BE.hex(offset)) is not cluster-aligned)")
        }
        let maxDirectory: UInt64 = 1024 * 65535
        guard size <= maxDirectory else {
            throw fail("bitmaps_ext: bitmap directory size (\(size)) exceeds the maximum supported size (\(maxDirectory))")
        }
    }

    /// The header cluster's bytes as QEMU 7.2's qcow2_update_header lays them out: fixed fields
    /// (72 bytes for v2; 112 + unknown fields for v3), then the extensions in QEMU's order
    /// (backing format, data file, feature name table (v3, clusters > 4 KiB), bitmaps, unknown
    /// ones), the end marker, and the backing file name right after it.
    ///
    /// `backing_file_offset`/`backing_file_size` and `header_length` are computed here, not
    /// taken from the stored fields. The result is not padded: the caller writes it at offset 0
    /// and should zero the rest of the first cluster; it must check `count <= clusterSize`
    /// (QEMU fails with ENOSPC otherwise).
    public func serialized() -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(1024)
        let headerLength: UInt32 = version >= 3
            ? QCOW2Header.v3HeaderLength + UInt32(unknownHeaderFields.count)
            : QCOW2Header.v2HeaderLength
        QCOW2BE.append32(&b, QCOW2Header.magic)
        QCOW2BE.append32(&b, version)
        QCOW2BE.append64(&b, 0)  // backing_file_offset, patched below
        QCOW2BE.append32(&b, 0)  // backing_file_size, patched below
        QCOW2BE.append32(&b, clusterBits)
        QCOW2BE.append64(&b, size)
        QCOW2BE.append32(&b, cryptMethod)
        QCOW2BE.append32(&b, l1Size)
        QCOW2BE.append64(&b, l1TableOffset)
        QCOW2BE.append64(&b, refcountTableOffset)
        QCOW2BE.append32(&b, refcountTableClusters)
        QCOW2BE.append32(&b, nbSnapshots)
        QCOW2BE.append64(&b, snapshotsOffset)
        if version >= 3 {
            QCOW2BE.append64(&b, incompatibleFeatures)
            QCOW2BE.append64(&b, compatibleFeatures)
            QCOW2BE.append64(&b, autoclearFeatures)
            QCOW2BE.append32(&b, refcountOrder)
            QCOW2BE.append32(&b, headerLength)
            b.append(compressionType)
            b.append(contentsOf: [UInt8](repeating: 0, count: 7))
            b.append(contentsOf: unknownHeaderFields)
        }

        func add(_ type: UInt32, _ data: [UInt8]) {
            QCOW2BE.append32(&b, type)
            QCOW2BE.append32(&b, UInt32(data.count))
            b.append(contentsOf: data)
            let pad = (8 - data.count % 8) % 8
            b.append(contentsOf: [UInt8](repeating: 0, count: pad))
        }
        if let backingFormat { add(QCOW2Header.extensionBackingFormat, FileName.bytes(of: backingFormat)) }
        if let dataFileName, hasDataFile { add(QCOW2Header.extensionDataFile, FileName.bytes(of: dataFileName)) }
        if version >= 3 && clusterSize > 4096 {
            var table: [UInt8] = []
            for feature in QCOW2Header.qemuFeatureTable {
                table.append(feature.type)
                table.append(feature.bit)
                var name = Array(feature.name.utf8.prefix(46))
                name.append(contentsOf: [UInt8](repeating: 0, count: 46 - name.count))
                table.append(contentsOf: name)
            }
            add(QCOW2Header.extensionFeatureTable, table)
        }
        if let bitmapsExtension { add(QCOW2Header.extensionBitmaps, bitmapsExtension) }
        for ext in unknownExtensions { add(ext.type, ext.data) }
        add(QCOW2Header.extensionEnd, [])

        if let backingFileName {
            let name = FileName.bytes(of: backingFileName)
            QCOW2BE.put64(&b, 8, UInt64(b.count))
            QCOW2BE.put32(&b, 16, UInt32(name.count))
            b.append(contentsOf: name)
        }
        return b
    }
}
