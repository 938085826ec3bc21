import DiskIO
import Glibc

/// A change of the image's metadata that becomes visible in one write: the header's
/// l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots and
/// snapshots_offset (bytes 36..<72, one write inside the first page, which a kill never splits),
/// and when the header extensions change too (persistent bitmaps: the bitmaps extension and
/// its autoclear bit), the whole header as the first page, again one write.
///
/// Why: a snapshot create, delete or apply changes refcounts and the COPIED flags of the active
/// tables together, and `qemu-img check` calls every moment between the two writes corrupt
/// (COPIED set on a cluster with refcount 2, or clear on one with refcount 1). So everything
/// that changes is written anew into clusters that are free in the current image: the changed
/// refcount blocks (`shadow` copies), a new refcount table, new active L2 tables and L1 table,
/// the new snapshot table. The current structures stay untouched until the header switches;
/// the new refcounts already count them free. A kill before the switch leaves the old image
/// (with garbage in free clusters), after it the new one, with nothing leaked.
///
/// New clusters are found first-fit among the clusters the current refcounts call free, and
/// are never clusters this switch frees (those stay in use until the header moves).
final class QCOW2MetadataSwitch {
    let file: DiskFile
    let path: String
    /// The refcounts on disk (read only: nothing is written through it).
    let old: QCOW2Refcounts
    let bits: UInt64
    let perBlock: UInt64
    let order: Int
    /// For each refcount table index: the new block's offset, 0 while unchanged.
    private var shadow: [UInt64] = []
    /// The new blocks, written to their own (free) clusters on eviction and at the end.
    private let blocks: QCOW2TableCache
    /// Where the next free-cluster search starts (a cluster index).
    private var hint: UInt64 = 0
    /// The file's size before anything was written (a refusal part-way cuts it back).
    let originalFileSize: UInt64
    /// Set once the header write that switches to the new metadata has returned: from then
    /// on the new structures are the image, and nothing may be undone (`abandon` does nothing).
    private(set) var switched = false
    /// SIGINT/SIGTERM seen by the sync after the switch (DiskFile.sync throws once one is
    /// pending): the new metadata is written but not synced; `commit` returns normally and the
    /// caller, after updating its state, reports this.
    private(set) var interruptedAfterSwitch: InterruptedError?

    init(image: QCOW2Image) throws {
        file = image.file
        path = image.path
        old = try QCOW2Refcounts(file: image.file, path: image.path, header: image.header)
        bits = UInt64(image.header.clusterBits)
        perBlock = old.perBlock
        order = old.order
        blocks = QCOW2TableCache(file: image.file, tableSize: image.clusterSize, budgetBytes: 4 << 20)
        originalFileSize = try image.file.size()
    }

    var clusterSize: UInt64 { UInt64(1) << bits }

    // MARK: - Refcounts of the new image

    /// The block `refcount(ofCluster:)` read last (one lookup per block, not per cluster, for
    /// a walk over a table's entries); dropped whenever a refcount changes.
    private var lastRead: (index: Int, words: [UInt64])?
    /// Runs of clusters whose refcount dropped to 0 (their space is given back after the
    /// switch, as QEMU's pass-discard-snapshot does).
    private(set) var freed: [(cluster: UInt64, count: UInt64)] = []

    /// The refcount `cluster` will have after the switch.
    func refcount(ofCluster cluster: UInt64) throws -> UInt64 {
        let index = Int(cluster / perBlock)
        if let last = lastRead, last.index == index {
            return Self.get(last.words, index: Int(cluster % perBlock), order: order)
        }
        var words: [UInt64]
        if index < shadow.count, shadow[index] != 0 {
            words = try blocks.table(at: shadow[index])
        } else {
            let block = index < old.table.count ? old.table[index] & qcow2OffsetMask : 0
            if block == 0 { return 0 }
            words = try old.blocks.table(at: block)
        }
        lastRead = (index, words)
        return Self.get(words, index: Int(cluster % perBlock), order: order)
    }

    /// Adds `delta` to the new refcount of `count` clusters from `cluster`.
    func adjust(cluster first: UInt64, count: UInt64 = 1, by delta: Int64) throws {
        lastRead = nil
        var cluster = first
        let end = first + count
        while cluster < end {
            let block = try shadowBlock(Int(cluster / perBlock))
            let stop = min(end, (cluster / perBlock + 1) * perBlock)
            let order = self.order, maxValue = old.maxRefcount, perBlock = self.perBlock
            let start = cluster
            var dropped: [(cluster: UInt64, count: UInt64)] = []
            try blocks.update(at: block) { words in
                for c in start..<stop {
                    let at = Int(c % perBlock)
                    let value = Self.get(words, index: at, order: order)
                    let new: UInt64
                    if delta >= 0 {
                        let (sum, overflow) = value.addingReportingOverflow(UInt64(delta))
                        // QEMU's update_refcount: -EINVAL when a refcount would overflow.
                        guard !overflow, sum <= maxValue else {
                            throw SnapshotFailure(code: EINVAL)
                        }
                        new = sum
                    } else {
                        guard value >= delta.magnitude else {
                            throw ImageError(path: self.path, message: "Image is corrupt: refcount of cluster \(c) would drop below zero")
                        }
                        new = value - delta.magnitude
                        if new == 0 {
                            if let l = dropped.last, l.cluster + l.count == c { dropped[dropped.count - 1].count += 1 } else { dropped.append((c, 1)) }
                        }
                    }
                    Self.set(&words, index: at, order: order, value: new)
                }
            }
            for d in dropped {
                if let l = freed.last, l.cluster + l.count == d.cluster { freed[freed.count - 1].count += d.count } else { freed.append(d) }
            }
            cluster = stop
        }
    }

    /// Adds `delta` to every cluster of the host range [offset, offset + length).
    func adjust(range offset: UInt64, length: UInt64, by delta: Int64) throws {
        guard length > 0 else { return }
        let first = offset >> bits, last = (offset + length - 1) >> bits
        try adjust(cluster: first, count: last - first + 1, by: delta)
    }

    /// The new block for table index `index`, made on first use: a copy of the old block (or
    /// zeros) in a free cluster; the new cluster is counted, the old block's is released.
    private func shadowBlock(_ index: Int) throws -> UInt64 {
        if index < shadow.count, shadow[index] != 0 { return shadow[index] }
        // QEMU's limit on the refcount table (QCOW_MAX_REFTABLE_SIZE): -EFBIG past it.
        guard UInt64(index) < QCOW2Header.maxRefcountTableBytes / 8 else { throw SnapshotFailure(code: EFBIG) }
        if index >= shadow.count { shadow += [UInt64](repeating: 0, count: index + 1 - shadow.count) }
        let cluster = try findFree(count: 1)
        let oldBlock = index < old.table.count ? old.table[index] & qcow2OffsetMask : 0
        let words = oldBlock != 0 ? try old.blocks.table(at: oldBlock)
                                  : [UInt64](repeating: 0, count: Int(clusterSize / 8))
        try blocks.install(at: cluster << bits, words: words)
        shadow[index] = cluster << bits
        try adjust(cluster: cluster, by: 1)
        if oldBlock != 0 { try adjust(cluster: oldBlock >> bits, by: -1) }
        return cluster << bits
    }

    /// QCOW2TableCache's refcount accessors, with the default 16-bit width inlined (a walk
    /// over a large image changes millions of entries).
    @inline(__always)
    static func get(_ words: [UInt64], index: Int, order: Int) -> UInt64 {
        if order == 4 { return (words[index >> 2] >> UInt64((3 - (index & 3)) * 16)) & 0xffff }
        return QCOW2TableCache.refcount(in: words, index: index, order: order)
    }

    @inline(__always)
    static func set(_ words: inout [UInt64], index: Int, order: Int, value: UInt64) {
        if order == 4 {
            let shift = UInt64((3 - (index & 3)) * 16)
            words[index >> 2] = (words[index >> 2] & ~(0xffff << shift)) | ((value & 0xffff) << shift)
            return
        }
        QCOW2TableCache.setRefcount(in: &words, index: index, order: order, value: value)
    }

    // MARK: - Allocation

    /// `count` contiguous clusters, free now and counted 1 in the new refcounts.
    func allocate(count: UInt64) throws -> UInt64 {
        let first = try findFree(count: count)
        try adjust(cluster: first, count: count, by: 1)
        return first << bits
    }

    /// Allocates and writes `bytes` (zero-padded to whole clusters); returns the offset.
    func allocateAndWrite(_ bytes: [UInt8]) throws -> UInt64 {
        let clusters = max(1, (UInt64(bytes.count) + clusterSize - 1) >> bits)
        let offset = try allocate(count: clusters)
        var padded = bytes
        padded += [UInt8](repeating: 0, count: Int(clusters << bits) - bytes.count)
        try file.qcow2Write(padded, at: offset)
        return offset
    }

    /// First fit, from the hint on, of clusters the current refcounts call free (not yet
    /// counted anywhere: the caller counts them).
    private func findFree(count: UInt64) throws -> UInt64 {
        var start = hint, length: UInt64 = 0, cluster = hint
        let table = old.table
        while length < count {
            let index = Int(cluster / perBlock)
            let block = index < table.count ? table[index] & qcow2OffsetMask : 0
            if block == 0 {
                if length == 0 { start = cluster }
                let blockEnd = UInt64(index + 1) * perBlock
                length += blockEnd - cluster
                cluster = blockEnd
                continue
            }
            let words = try old.blocks.table(at: block)
            var at = Int(cluster % perBlock)
            while at < Int(perBlock) && length < count {
                if Self.get(words, index: at, order: order) == 0 {
                    if length == 0 { start = cluster }
                    length += 1
                } else {
                    length = 0
                }
                at += 1
                cluster += 1
            }
        }
        guard start + count < (UInt64(1) << (56 - bits)) else { throw SnapshotFailure(code: EFBIG) }
        hint = start + count
        return start
    }

    /// `count` contiguous clusters free in the current image and not counted anywhere: for a
    /// rebuild that writes refcounts of another width (QCOW2RefcountRebuild) and counts them
    /// in its own blocks. `restart` searches from cluster 0 again (a new placement attempt).
    func freeRun(count: UInt64, restart: Bool = false) throws -> UInt64 {
        if restart { hint = 0 }
        return try findFree(count: count)
    }

    // MARK: - The switch

    /// The header fields the switch writes.
    struct Fields {
        var l1Size: UInt32
        var l1Offset: UInt64
        var nbSnapshots: UInt32
        var snapshotsOffset: UInt64
        /// A new virtual size (snapshot apply of a snapshot of another size), written in the
        /// same write: the switch then covers bytes 24..<72 (size, crypt_method unchanged).
        var size: UInt64? = nil
    }

    /// Writes the new refcount table (the old one released), syncs everything written so far,
    /// then switches the header in one write, and syncs again. Updates `header`.
    ///
    /// `extensions` changes what lives in the header's extension area as well (the bitmaps
    /// extension and its autoclear bit): then the one write is the whole header, fixed fields
    /// and extensions, as the first page (`headerPage`), which a kill never splits; the old
    /// and the new header must each fit that page (checked before anything is written there).
    func commit(_ fields: Fields, header: inout QCOW2Header,
                extensions: ((inout QCOW2Header) -> Void)? = nil) throws {
        var page: [UInt8]? = nil
        var updated = header
        if let extensions {
            extensions(&updated)
            page = try Self.headerPage(old: header, new: &updated, clusterSize: Int(clusterSize), path: path)
        }
        try adjust(cluster: old.tableOffset >> bits, count: old.tableClusters, by: -1)
        let perCluster = clusterSize / 8
        func clustersFor(_ entries: Int) -> UInt64 { (UInt64(entries) + perCluster - 1) / perCluster }
        var clusters = clustersFor(max(old.table.count, shadow.count))
        var tableOffset: UInt64 = 0
        while true {
            tableOffset = try allocate(count: clusters)
            let need = clustersFor(max(old.table.count, shadow.count))
            if need <= clusters { break }
            // The table's own clusters needed a block past its end: a larger one (this run is
            // only left unused in free space; it is counted free again).
            try adjust(cluster: tableOffset >> bits, count: clusters, by: -1)
            clusters = need + 1
        }
        var table = [UInt64](repeating: 0, count: Int(clusters * perCluster))
        for i in 0..<table.count {
            if i < shadow.count, shadow[i] != 0 { table[i] = shadow[i] } else if i < old.table.count { table[i] = old.table[i] }
        }
        try blocks.flush()
        try file.qcow2Write(QCOW2BE.bytes(table), at: tableOffset)
        try file.sync()
        var field: [UInt8] = []
        if let size = fields.size {
            QCOW2BE.append64(&field, size)
            QCOW2BE.append32(&field, header.cryptMethod)
        }
        QCOW2BE.append32(&field, fields.l1Size)
        QCOW2BE.append64(&field, fields.l1Offset)
        QCOW2BE.append64(&field, tableOffset)
        QCOW2BE.append32(&field, UInt32(clusters))
        QCOW2BE.append32(&field, fields.nbSnapshots)
        QCOW2BE.append64(&field, fields.snapshotsOffset)
        if var page {
            page.replaceSubrange(fields.size == nil ? 36..<72 : 24..<72, with: field)
            try file.qcow2Write(page, at: 0)
            header = updated
        } else {
            try file.qcow2Write(field, at: fields.size == nil ? 36 : 24)
        }
        switched = true
        if let size = fields.size { header.size = size }
        header.l1Size = fields.l1Size
        header.l1TableOffset = fields.l1Offset
        header.refcountTableOffset = tableOffset
        header.refcountTableClusters = UInt32(clusters)
        header.nbSnapshots = fields.nbSnapshots
        header.snapshotsOffset = fields.snapshotsOffset
        do {
            try file.sync()
        } catch let interrupted as InterruptedError {
            // The switch is written (a process kill keeps it); only the punching is left out.
            interruptedAfterSwitch = interrupted
            return
        }
        // Nothing references the freed clusters now, on disk either: give their space back
        // (best effort, as QEMU's discard). Only clusters still at 0 (never reused here).
        for run in freed {
            var c = run.cluster
            while c < run.cluster + run.count {
                guard try refcount(ofCluster: c) == 0 else { c += 1; continue }
                var end = c + 1
                while end < run.cluster + run.count, try refcount(ofCluster: end) == 0 { end += 1 }
                try? file.punchHole(at: c << bits, length: (end - c) << bits)
                c = end
            }
        }
    }

    /// The first page of the header cluster for `new` (zero-padded): what `commit` writes in
    /// one go when the extensions change. `new`'s backing name offset follows the layout.
    static func headerPage(old: QCOW2Header, new: inout QCOW2Header, clusterSize: Int, path: String) throws -> [UInt8] {
        let size = min(DiskFile.pageSize, clusterSize)
        var bytes = new.serialized()
        guard bytes.count <= size, old.serialized().count <= size else {
            throw ImageError(path: path, message: "the image header with its extensions does not fit in one page (\(size) bytes), so it cannot be switched in one write")
        }
        if let name = new.backingFileName {
            let length = FileName.byteCount(name)
            new.backingFileOffset = UInt64(bytes.count - length)
            new.backingFileSize = UInt32(length)
        }
        bytes += [UInt8](repeating: 0, count: size - bytes.count)
        return bytes
    }

    /// The switch to refcount structures of another width, written whole into free clusters
    /// by the caller and synced: bytes 48..<100 (refcount table offset and clusters, the
    /// snapshot fields and feature bits as they are, refcount_order) in one write inside the
    /// first page, then a sync. Updates `header`. Only for version 3 headers (v2 has no
    /// refcount_order field and only 16-bit refcounts).
    func switchRefcounts(tableOffset: UInt64, tableClusters: UInt32, order: UInt32, header: inout QCOW2Header) throws {
        precondition(header.version >= 3)
        var field: [UInt8] = []
        QCOW2BE.append64(&field, tableOffset)
        QCOW2BE.append32(&field, tableClusters)
        QCOW2BE.append32(&field, header.nbSnapshots)
        QCOW2BE.append64(&field, header.snapshotsOffset)
        QCOW2BE.append64(&field, header.incompatibleFeatures)
        QCOW2BE.append64(&field, header.compatibleFeatures)
        QCOW2BE.append64(&field, header.autoclearFeatures)
        QCOW2BE.append32(&field, order)
        try file.qcow2Write(field, at: 48)
        header.refcountTableOffset = tableOffset
        header.refcountTableClusters = tableClusters
        header.refcountOrder = order
        do {
            try file.sync()
        } catch let interrupted as InterruptedError {
            // The header is written: the image has the new width, whatever the caller was doing.
            throw interrupted.naming(path, outcome: "has the new refcount width (the new header is written but was not synced to disk)")
        }
    }

    /// After a refusal before the switch: the image is unchanged; space added past its old
    /// end is cut off again (best effort).
    func abandon() {
        // After the switch the file's new end holds the image's metadata.
        guard !switched else { return }
        if let size = try? file.size(), size > originalFileSize, !((try? file.kind().isDevice) ?? true) {
            try? file.truncate(to: originalFileSize)
        }
    }
}
