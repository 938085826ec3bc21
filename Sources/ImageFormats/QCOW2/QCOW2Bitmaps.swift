import DiskIO
import Glibc

/// One entry of the bitmap directory (docs/interop/qcow2.txt, "Bitmaps extension"): where its
/// bitmap table is, its flags, type, granularity and name. Extra data is kept verbatim (QEMU
/// refuses any, so a loaded directory has none, but a caller building entries may carry it).
struct QCOW2BitmapEntry: Equatable {
    var tableOffset: UInt64
    /// Entries (8 bytes each) in the bitmap table.
    var tableSize: UInt32
    var flags: UInt32
    var type: UInt8 = QCOW2BitmapEntry.dirtyTrackingType
    var granularityBits: UInt8
    /// The name's bytes as stored (no terminator).
    var nameBytes: [UInt8]
    var extraData: [UInt8] = []

    static let flagInUse: UInt32 = 1 << 0
    static let flagAuto: UInt32 = 1 << 1
    static let flagExtraDataCompatible: UInt32 = 1 << 2
    /// QEMU 7.2's BME_RESERVED_FLAGS: it knows only in_use and auto.
    static let reservedFlags: UInt32 = 0xffff_fffc
    static let dirtyTrackingType: UInt8 = 1
    /// QEMU's constraints (block/qcow2-bitmap.c, BME_*).
    static let maxTableSize: UInt64 = 0x800_0000
    static let maxPhysicalSize: UInt64 = 0x2000_0000
    static let minGranularityBits: UInt8 = 9
    static let maxGranularityBits: UInt8 = 31
    static let maxNameSize = 1023
    static let maxBitmaps = 65535
    static let maxDirectorySize: UInt64 = 1024 * 65535
    /// Bitmap table entries: bits 1-8 and 56-63 reserved; bit 0 "all ones" without an offset.
    static let tableReservedMask: UInt64 = 0xff00_0000_0000_01fe
    static let tableOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let tableAllOnes: UInt64 = 1

    var name: String { QCOW2BE.string(nameBytes[...]) }
    var inUse: Bool { flags & Self.flagInUse != 0 }
    var isAuto: Bool { flags & Self.flagAuto != 0 }
    var granularity: UInt64 { UInt64(1) << UInt64(granularityBits) }

    /// Bytes this entry takes in the directory (8-byte aligned).
    static func size(nameSize: Int, extraSize: Int) -> Int { (24 + nameSize + extraSize + 7) & ~7 }
    var size: Int { Self.size(nameSize: nameBytes.count, extraSize: extraData.count) }

    /// Bitmap table entries a bitmap of `granularity` over `virtualSize` bytes needs: one per
    /// cluster of serialized bits, the bits rounded to 64-bit words (QEMU's
    /// bdrv_dirty_bitmap_serialization_size, then size_to_clusters).
    static func tableEntries(virtualSize: UInt64, granularity: UInt64, clusterSize: UInt64) -> UInt64 {
        let bits = DirtyBitmap.chunks(virtualSize, granularity)
        let bytes = (bits + 63) / 64 * 8
        return (bytes + clusterSize - 1) / clusterSize
    }

    /// QEMU's check_dir_entry (it refuses to open an image with an entry failing it).
    func satisfiesConstraints(clusterSize: UInt64, virtualSize: UInt64) -> Bool {
        if tableSize == 0 || tableOffset == 0 || tableOffset % clusterSize != 0
            || UInt64(tableSize) > Self.maxTableSize || granularityBits > Self.maxGranularityBits
            || granularityBits < Self.minGranularityBits || flags & Self.reservedFlags != 0
            || nameBytes.count > Self.maxNameSize || type != Self.dirtyTrackingType {
            return false
        }
        let physical = UInt64(tableSize) * clusterSize
        if physical > Self.maxPhysicalSize { return false }
        // An in-use bitmap may have a stale size (resized without storing it).
        if !inUse && virtualSize > (physical * 8) << UInt64(granularityBits) { return false }
        return true
    }

    /// QEMU's check_table_entry.
    static func tableEntryIsValid(_ entry: UInt64, clusterSize: UInt64) -> Bool {
        if entry & tableReservedMask != 0 { return false }
        let offset = entry & tableOffsetMask
        if offset != 0 && (entry & tableAllOnes != 0 || offset % clusterSize != 0) { return false }
        return true
    }
}

/// The bitmap directory: reading and validating it as QEMU's bitmap_list_load does (with its
/// messages, which become "Could not open 'FILE': MESSAGE"), the tables and bits behind it, and
/// the directory's bytes for a store.
enum QCOW2BitmapDirectory {
    /// The bitmaps extension's fields (24 bytes: count, reserved, directory size and offset).
    struct Extension: Equatable {
        var count: UInt32
        var directorySize: UInt64
        var directoryOffset: UInt64

        init(count: UInt32, directorySize: UInt64, directoryOffset: UInt64) {
            self.count = count
            self.directorySize = directorySize
            self.directoryOffset = directoryOffset
        }

        init?(_ data: [UInt8]?) {
            guard let data, data.count >= 24 else { return nil }
            count = QCOW2BE.u32(data, 0)
            directorySize = QCOW2BE.u64(data, 8)
            directoryOffset = QCOW2BE.u64(data, 16)
        }

        var bytes: [UInt8] {
            var b: [UInt8] = []
            QCOW2BE.append32(&b, count)
            QCOW2BE.append32(&b, 0)
            QCOW2BE.append64(&b, directorySize)
            QCOW2BE.append64(&b, directoryOffset)
            return b
        }
    }

    /// The extension QEMU uses: present and marked consistent by the autoclear bit (with the
    /// bit clear a program without bitmap support wrote the image and the bitmaps are stale).
    static func activeExtension(_ header: QCOW2Header) -> Extension? {
        guard header.version >= 3, header.autoclearFeatures & QCOW2Header.autoclearBitmaps != 0,
              let ext = Extension(header.bitmapsExtension), ext.count > 0 else { return nil }
        return ext
    }

    /// The directory's entries, checked as QEMU checks them when it opens the image.
    static func load(file: DiskFile, header: QCOW2Header, virtualSize: UInt64, path: String) throws -> [QCOW2BitmapEntry] {
        guard let ext = activeExtension(header) else { return [] }
        func fail(_ message: String) -> ImageError { ImageError(path: path, message: message) }
        guard ext.directorySize > 0 else { throw fail("Requested bitmap directory size is zero") }
        guard ext.directorySize <= QCOW2BitmapEntry.maxDirectorySize else {
            throw fail("Requested bitmap directory size is too big")
        }
        let (end, overflow) = ext.directoryOffset.addingReportingOverflow(ext.directorySize)
        guard !overflow, end <= (try file.size()) else {
            throw fail("Failed to read bitmap directory: Input/output error")
        }
        let dir = try file.qcow2ReadBytes(count: Int(ext.directorySize), at: ext.directoryOffset)
        let clusterSize = UInt64(header.clusterSize)
        var entries: [QCOW2BitmapEntry] = []
        var p = 0
        while p < dir.count {
            guard p + 24 <= dir.count else { throw fail("Broken bitmap directory") }
            guard entries.count < Int(ext.count) else {
                throw fail("More bitmaps found than specified in header extension")
            }
            let nameSize = Int(QCOW2BE.u16(dir, p + 18))
            let extraSize = Int(QCOW2BE.u32(dir, p + 20))
            let next = p + QCOW2BitmapEntry.size(nameSize: nameSize, extraSize: extraSize)
            guard next <= dir.count else { throw fail("Broken bitmap directory") }
            guard extraSize == 0 else { throw fail("Bitmap extra data is not supported") }
            let nameStart = p + 24 + extraSize
            let entry = QCOW2BitmapEntry(tableOffset: QCOW2BE.u64(dir, p), tableSize: QCOW2BE.u32(dir, p + 8),
                                         flags: QCOW2BE.u32(dir, p + 12), type: dir[p + 16],
                                         granularityBits: dir[p + 17],
                                         nameBytes: Array(dir[nameStart..<(nameStart + nameSize)]),
                                         extraData: Array(dir[(p + 24)..<nameStart]))
            guard entry.satisfiesConstraints(clusterSize: clusterSize, virtualSize: virtualSize) else {
                throw fail("Bitmap '\(entry.name)' doesn't satisfy the constraints")
            }
            entries.append(entry)
            p = next
        }
        guard entries.count == Int(ext.count) else {
            throw fail("Less bitmaps found than specified in header extension")
        }
        return entries
    }

    /// A bitmap's table, every entry checked (QEMU's bitmap_table_load).
    static func loadTable(_ entry: QCOW2BitmapEntry, file: DiskFile, clusterSize: UInt64, path: String) throws -> [UInt64] {
        let fileSize = try file.size()
        let bytes = UInt64(entry.tableSize) * 8
        guard entry.tableOffset + bytes <= fileSize else {
            throw ImageError(path: path, message: "Could not read bitmap_table table from image for bitmap '\(entry.name)': Input/output error")
        }
        let table = QCOW2BE.words(try file.qcow2ReadBytes(count: Int(bytes), at: entry.tableOffset))
        for word in table where !QCOW2BitmapEntry.tableEntryIsValid(word, clusterSize: clusterSize) {
            throw ImageError(path: path, message: "Could not read bitmap_table table from image for bitmap '\(entry.name)': Invalid argument")
        }
        return table
    }

    /// The bits behind a table (QEMU's load_bitmap_data): entry 0 reads as all zeros, 1 as all
    /// ones, else the cluster holds the next cluster's worth of serialized bits.
    static func loadBits(_ entry: QCOW2BitmapEntry, table: [UInt64], file: DiskFile, clusterSize: UInt64,
                         virtualSize: UInt64, path: String) throws -> DirtyBitmap {
        var bitmap = DirtyBitmap(granularity: entry.granularity, size: virtualSize)
        let need = QCOW2BitmapEntry.tableEntries(virtualSize: virtualSize, granularity: entry.granularity, clusterSize: clusterSize)
        guard need == UInt64(table.count) else {
            throw ImageError(path: path, message: "Could not read bitmap '\(entry.name)' from image: Invalid argument")
        }
        let fileSize = try file.size()
        let perCluster = clusterSize * 8  // chunks one data cluster covers
        for (i, word) in table.enumerated() {
            let offset = word & QCOW2BitmapEntry.tableOffsetMask
            if offset == 0 {
                if word & QCOW2BitmapEntry.tableAllOnes != 0 {
                    bitmap.set(chunks: UInt64(i) * perCluster, count: perCluster)
                }
                continue
            }
            guard offset + clusterSize <= fileSize else {
                throw ImageError(path: path, message: "Could not read bitmap '\(entry.name)' from image: Input/output error")
            }
            let data = try file.qcow2ReadBytes(count: Int(clusterSize), at: offset)
            bitmap.deserialize(data, at: i * Int(clusterSize))
        }
        return bitmap
    }

    /// What QEMU checks when it opens the image: the directory, and the table of every bitmap
    /// not in use (it loads those bitmaps' bits; a bad entry fails the open).
    static func validate(file: DiskFile, header: QCOW2Header, virtualSize: UInt64, path: String) throws -> [QCOW2BitmapEntry] {
        let entries = try load(file: file, header: header, virtualSize: virtualSize, path: path)
        let clusterSize = UInt64(header.clusterSize)
        // A table several entries share is read once (a hostile directory could name one
        // 8 MiB table 65535 times).
        var checked = Set<[UInt64]>()
        for entry in entries where !entry.inUse {
            guard checked.insert([entry.tableOffset, UInt64(entry.tableSize), UInt64(entry.granularityBits)]).inserted else { continue }
            let table = try loadTable(entry, file: file, clusterSize: clusterSize, path: path)
            guard QCOW2BitmapEntry.tableEntries(virtualSize: virtualSize, granularity: entry.granularity,
                                                clusterSize: clusterSize) == UInt64(table.count) else {
                throw ImageError(path: path, message: "Could not read bitmap '\(entry.name)' from image: Invalid argument")
            }
        }
        return entries
    }

    /// The directory's bytes for `entries`, in order.
    static func serialize(_ entries: [QCOW2BitmapEntry]) -> [UInt8] {
        var b: [UInt8] = []
        for e in entries {
            let start = b.count
            QCOW2BE.append64(&b, e.tableOffset)
            QCOW2BE.append32(&b, e.tableSize)
            QCOW2BE.append32(&b, e.flags)
            b.append(e.type)
            b.append(e.granularityBits)
            QCOW2BE.append16(&b, UInt16(e.nameBytes.count))
            QCOW2BE.append32(&b, UInt32(e.extraData.count))
            b += e.extraData
            b += e.nameBytes
            b += [UInt8](repeating: 0, count: start + e.size - b.count)
        }
        return b
    }

    /// The table and data clusters of a bitmap's bits, written through `sw` into clusters free
    /// now (QEMU's store_bitmap_data: a cluster of bits that are all zero gets no cluster).
    static func store(_ bitmap: DirtyBitmap, clusterSize: UInt64, sw: QCOW2MetadataSwitch) throws -> (offset: UInt64, size: UInt32) {
        let count = QCOW2BitmapEntry.tableEntries(virtualSize: bitmap.size, granularity: bitmap.granularity, clusterSize: clusterSize)
        var table = [UInt64](repeating: 0, count: Int(count))
        for i in 0..<Int(count) {
            let bytes = bitmap.serializedBytes(from: i * Int(clusterSize), count: Int(clusterSize))
            guard bytes.contains(where: { $0 != 0 }) else { continue }
            table[i] = try sw.allocateAndWrite(bytes)
        }
        let offset = try sw.allocateAndWrite(QCOW2BE.bytes(table))
        return (offset, UInt32(count))
    }

    /// Releases (in `sw`'s new refcounts) a stored bitmap's table and data clusters.
    static func release(_ entry: QCOW2BitmapEntry, file: DiskFile, clusterSize: UInt64, sw: QCOW2MetadataSwitch, path: String) throws {
        let table = try loadTable(entry, file: file, clusterSize: clusterSize, path: path)
        for word in table {
            let offset = word & QCOW2BitmapEntry.tableOffsetMask
            if offset != 0 { try sw.adjust(range: offset, length: clusterSize, by: -1) }
        }
        try sw.adjust(range: entry.tableOffset, length: UInt64(entry.tableSize) * 8, by: -1)
    }
}
