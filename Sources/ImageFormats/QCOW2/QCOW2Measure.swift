import DiskIO

extension QCOW2Image {
    /// QEMU's qcow2_detect_metadata_preallocation, which decides whether block status asks
    /// the file below a data cluster for holes (measure then counts such clusters as zeros):
    /// clusters in use (refcount > 0, counted up to the threshold) reaching
    /// max(allocated clusters × 10/9, allocated clusters + 2), i.e. clearly more clusters
    /// referenced than the file has blocks for.
    func looksMetadataPreallocated() throws -> Bool {
        let clusterSize = UInt64(header.clusterSize)
        let fileLength = try file.size()
        let real = try file.allocatedBytes() / clusterSize
        let threshold = max(real * 10 / 9, real + 2)
        let refcounts = try QCOW2Refcounts(file: file, path: path, header: header)
        let endCluster = (fileLength + clusterSize - 1) / clusterSize
        return try refcounts.countReferenced(below: endCluster, upTo: threshold) >= threshold
    }
}

/// `measure -O qcow2`: QEMU 7.2's qcow2_measure and qcow2_calc_prealloc_size, the sizes a new
/// qcow2 image would need: header cluster, whole L2 tables, L1 in whole clusters, refcount
/// structures covering all of that (a fixed point), then the data.
extension QCOW2Driver {
    func measure(_ job: FormatMeasureJob) throws -> MeasureResult {
        let options = job.options
        // In the order qcow2_measure reads them; it checks each option alone (compat=0.10
        // with extended_l2=on passes), unlike create.
        let extendedL2 = options.bool("extended_l2") ?? false
        let clusterSize = options.unsigned("cluster_size") ?? 65536
        guard clusterSize >= 512, clusterSize <= 2 << 20, clusterSize & (clusterSize - 1) == 0 else {
            throw MeasureError("Cluster size must be a power of two between 512 and 2048k")
        }
        if extendedL2 && clusterSize < 16384 {
            throw MeasureError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        var version = 3
        if let compat = options.string("compat") {
            // measure's parser knows only these two spellings (create also takes v2/v3).
            switch compat {
            case "0.10": version = 2
            case "1.1": version = 3
            default: throw MeasureError("Invalid compatibility level: '\(compat)'")
            }
        }
        let refcountBits = options.unsigned("refcount_bits") ?? 16
        guard refcountBits <= 64, refcountBits != 0, refcountBits & (refcountBits - 1) == 0 else {
            throw MeasureError("Refcount width must be a power of two and may not exceed 64 bits")
        }
        if version < 3 && refcountBits != 16 {
            throw MeasureError("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
        }
        let preallocation = options.string("preallocation") ?? "off"
        guard ["off", "metadata", "falloc", "full"].contains(preallocation) else {
            throw MeasureError("invalid parameter value: \(preallocation)")
        }
        // A LUKS payload would be measured too (QEMU first asks for its key secret); simg
        // creates no encrypted images, so it measures none. (aes, QEMU's old encryption, adds
        // nothing: it is measured as unencrypted, as QEMU does.)
        if options.string("encrypt.format") == "luks" {
            throw MeasureError("Encrypted images are not supported by simg")
        }
        let hasBackingFile = options.string("backing_file") != nil

        let entrySize: UInt64 = extendedL2 ? 16 : 8
        // The size check uses `-o size`/`--size` only (0 with a source image), as QEMU's.
        var virtualSize = Self.roundUp(options.unsigned("size") ?? 0, clusterSize)
        let l2Tables = Self.divRoundUp(virtualSize / clusterSize, clusterSize / entrySize)
        // QCOW_MAX_L1_SIZE: 32 MiB of L1 entries.
        if l2Tables > (32 << 20) / 8 {
            throw MeasureError("The image size is too large (try using a larger cluster size)")
        }

        var data: UInt64 = 0
        if let source = job.source {
            virtualSize = Self.roundUp(source.virtualSize, clusterSize)
            // A backing file of the new image may hold anything: every cluster may be needed.
            data = hasBackingFile ? virtualSize : try job.dataBytes(clusterSize: clusterSize)
        }
        if preallocation == "falloc" || preallocation == "full" { data = virtualSize }

        let full = Self.fullyAllocatedSize(virtualSize, clusterSize: clusterSize,
                                           refcountBits: refcountBits, entrySize: entrySize)
        var result = MeasureResult(required: full - virtualSize + data, fullyAllocated: full)
        // QEMU reports bitmaps when the target is v3 and the source can store persistent
        // bitmaps (a qcow2 v3 image), counting every bitmap fully allocated.
        if version >= 3, let source = job.source as? QCOW2Image, source.header.version >= 3 {
            result.bitmaps = try Self.bitmapsSize(source.persistentBitmaps(), virtualSize: source.virtualSize,
                                                  clusterSize: clusterSize)
        }
        return result
    }

    /// qcow2_calc_prealloc_size: the file size of an image with every cluster allocated.
    static func fullyAllocatedSize(_ virtualSize: UInt64, clusterSize cs: UInt64, refcountBits: UInt64,
                                   entrySize: UInt64) -> UInt64 {
        var meta = cs  // the header
        let l2Entries = roundUp(virtualSize / cs, cs / entrySize)
        meta += l2Entries * entrySize
        let l1Entries = roundUp(l2Entries * entrySize / cs, cs / 8)
        meta += l1Entries * 8
        meta += refcountMetadataSize(clusters: (meta + virtualSize) / cs, clusterSize: cs,
                                     refcountBits: refcountBits)
        return meta + virtualSize
    }

    /// qcow2_refcount_metadata_size (not generous): refcount blocks and table covering
    /// `clusters` clusters and themselves, found as a fixed point.
    static func refcountMetadataSize(clusters: UInt64, clusterSize cs: UInt64, refcountBits: UInt64) -> UInt64 {
        let perTable = cs / 8
        let perBlock = cs * 8 / refcountBits
        var table: UInt64 = 0, blocks: UInt64 = 0, total: UInt64 = 0, last: UInt64
        repeat {
            last = total
            blocks = divRoundUp(clusters + table + blocks, perBlock)
            table = divRoundUp(blocks, perTable)
            total = clusters + blocks + table
        } while total != last
        return (blocks + table) * cs
    }

    /// qcow2_get_persistent_dirty_bitmap_size: each bitmap's data and table fully allocated,
    /// plus the directory.
    static func bitmapsSize(_ bitmaps: [PersistentBitmap], virtualSize: UInt64, clusterSize cs: UInt64) -> UInt64 {
        var size: UInt64 = 0
        var directory: UInt64 = 0
        for bitmap in bitmaps {
            let bytes = divRoundUp(divRoundUp(virtualSize, bitmap.granularity), 8)
            let clusters = divRoundUp(bytes, cs)
            size += clusters * cs + roundUp(clusters * 8, cs)
            directory += roundUp(24 + UInt64(bitmap.name.utf8.count), 8)
        }
        return size + roundUp(directory, cs)
    }

    static func roundUp(_ x: UInt64, _ a: UInt64) -> UInt64 { divRoundUp(x, a) * a }
    static func divRoundUp(_ x: UInt64, _ a: UInt64) -> UInt64 { x / a + (x % a == 0 ? 0 : 1) }
}
