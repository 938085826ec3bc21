import DiskIO

/// The refcount structures of an image opened for writing: the refcount table (in memory),
/// refcount blocks (through their own write-back cache), and cluster allocation.
///
/// Refcounts are kept exact at all times (lazy refcounts are never used: the dirty bit is
/// never set). Ordering for crash safety follows the spec's implications: a refcount is raised
/// (and its block written before any table that points at the cluster, see `flush` and the L2
/// cache's `beforeWriteback`) before the cluster is used, and lowered only after the last
/// reference is gone, so a crash leaves at worst leaked clusters.
final class QCOW2Refcounts {
    let file: DiskFile
    let path: String
    let clusterBits: UInt64
    let order: Int
    /// Largest value one entry holds.
    let maxRefcount: UInt64
    /// Entries per refcount block.
    let perBlock: UInt64

    // Set here and by the refcount area of a preallocating resize (QCOW2RefcountArea.swift).
    var tableOffset: UInt64
    var tableClusters: UInt64
    /// Decoded refcount table entries (block host offsets, 0 = not allocated).
    var table: [UInt64]
    let blocks: QCOW2TableCache
    /// Where the next first-fit search starts (a cluster index).
    private var freeHint: UInt64 = 0
    /// Clusters at or past this index have never been in the file (nor past every refcount
    /// block's range in use): they are free, and in a regular file they read as zeros.
    /// On a device it starts at 0: the device's size says nothing about what the image uses,
    /// so allocation follows the refcounts alone (as QEMU's does) and a grown refcount table
    /// goes right after the ranges the blocks cover, not past the end of the device.
    var fileEndCluster: UInt64
    /// False on a device: it holds old data, so no cluster of it reads as zeros unwritten.
    let readsZeroPastEnd: Bool
    /// Called after the refcount table moved (the header must point at the new one).
    var tableMoved: ((_ offset: UInt64, _ clusters: UInt64) throws -> Void)?

    init(file: DiskFile, path: String, header: QCOW2Header) throws {
        self.file = file
        self.path = path
        clusterBits = UInt64(header.clusterBits)
        order = Int(header.refcountOrder)
        maxRefcount = order == 6 ? .max : (UInt64(1) << UInt64(1 << order)) - 1
        perBlock = UInt64(header.refcountBlockEntries)
        tableOffset = header.refcountTableOffset
        tableClusters = UInt64(header.refcountTableClusters)
        let bytes = try file.qcow2ReadBytes(count: Int(tableClusters << clusterBits), at: tableOffset)
        table = QCOW2BE.words(bytes)
        blocks = QCOW2TableCache(file: file, tableSize: header.clusterSize, budgetBytes: 1 << 20)
        readsZeroPastEnd = !(try file.kind().isDevice)
        let size = readsZeroPastEnd ? try file.size() : 0
        fileEndCluster = (size + (UInt64(1) << clusterBits) - 1) >> clusterBits
        for (i, entry) in table.enumerated() where entry != 0 {
            let offset = entry & qcow2OffsetMask
            guard offset & ((UInt64(1) << clusterBits) - 1) == 0 else {
                throw ImageError(path: path, message: "Image is corrupt: refcount block offset \(QCOW2BE.hex(offset)) unaligned (refcount table index \(i))")
            }
        }
    }

    var clusterSize: UInt64 { UInt64(1) << clusterBits }

    // MARK: - Entries

    /// The number of clusters up to and including the last one with a reference, in a file
    /// of `fileSize` bytes: where a shrink or an emptied image cuts the file (the header's
    /// cluster 0 always stays).
    func usedClusterEnd(fileSize: UInt64) throws -> UInt64 {
        var end = (fileSize + (1 << clusterBits) - 1) >> clusterBits
        while end > 1, try refcount(ofCluster: end - 1) == 0 { end -= 1 }
        return end
    }

    /// How many of the clusters `0 ..< end` have a reference, counted up to `limit` at most
    /// (QEMU's metadata preallocation test): each refcount block fetched once and read in
    /// place, not looked up again per cluster.
    func countReferenced(below end: UInt64, upTo limit: UInt64) throws -> UInt64 {
        var count: UInt64 = 0
        var first: UInt64 = 0
        var index = 0
        while first < end && count < limit && index < table.count {
            let block = table[index] & qcow2OffsetMask
            let n = Int(min(perBlock, end - first))
            if block != 0 {
                let words = try blocks.table(at: block)
                var i = 0
                while i < n && count < limit {
                    if QCOW2TableCache.refcount(in: words, index: i, order: order) != 0 { count += 1 }
                    i += 1
                }
            }
            first += perBlock
            index += 1
        }
        return count
    }

    /// The refcount of the cluster with index `cluster` (0 where no block covers it).
    func refcount(ofCluster cluster: UInt64) throws -> UInt64 {
        let index = cluster / perBlock
        guard index < UInt64(table.count) else { return 0 }
        let block = table[Int(index)] & qcow2OffsetMask
        if block == 0 { return 0 }
        let words = try blocks.table(at: block)
        return QCOW2TableCache.refcount(in: words, index: Int(cluster % perBlock), order: order)
    }

    /// Adds `delta` to the refcount of each of `count` clusters from `cluster`. A result below
    /// zero or above the entry width's maximum is refused before anything changes for that
    /// cluster. The blocks must exist when raising (allocation makes sure of it).
    func adjust(cluster first: UInt64, count: UInt64 = 1, by delta: Int64) throws {
        for cluster in first..<(first + count) {
            let index = cluster / perBlock
            guard index < UInt64(table.count), table[Int(index)] & qcow2OffsetMask != 0 else {
                throw corrupt("cannot change the refcount of cluster \(cluster): it is not covered by a refcount block")
            }
            let block = table[Int(index)] & qcow2OffsetMask
            let at = Int(cluster % perBlock)
            let old = QCOW2TableCache.refcount(in: try blocks.table(at: block), index: at, order: order)
            let new: UInt64
            if delta >= 0 {
                let (sum, overflow) = old.addingReportingOverflow(UInt64(delta))
                guard !overflow, sum <= maxRefcount else {
                    throw ImageError(path: path, message: "refcount of cluster \(cluster) would exceed the maximum of \(maxRefcount) for \(1 << order)-bit refcounts")
                }
                new = sum
            } else {
                guard old >= delta.magnitude else {
                    throw corrupt("refcount of cluster \(cluster) would drop below zero (it is \(old))")
                }
                new = old - delta.magnitude
            }
            let order = self.order
            try blocks.update(at: block) { QCOW2TableCache.setRefcount(in: &$0, index: at, order: order, value: new) }
            if new == 0 && cluster < freeHint { freeHint = cluster }
        }
    }

    // MARK: - Allocation

    /// Allocates `count` contiguous clusters (first fit from the free hint) with refcount 1;
    /// returns the host offset of the first. `fresh` tells whether they lie past the old end
    /// of the file (so they read as zeros without being written; never on a device).
    func allocate(count: UInt64) throws -> (offset: UInt64, fresh: Bool) {
        precondition(count > 0)
        // Ranges the run touches may have no refcount block yet. Their blocks go at the start
        // of the run, the data after them (blocks at the start of their own range would split
        // runs of a block's span or more, forever).
        var reserve: UInt64 = 0
        while true {
            let start = try findFreeRun(count: count + reserve)
            var missing: [UInt64] = []
            var index = start / perBlock
            while index <= (start + count + reserve - 1) / perBlock {
                if index >= UInt64(table.count) || table[Int(index)] & qcow2OffsetMask == 0 {
                    missing.append(index)
                }
                index += 1
            }
            if let last = missing.last, last >= UInt64(table.count) {
                // The table moves past everything in use; search again.
                try growTable(toCover: last)
                continue
            }
            if UInt64(missing.count) > reserve {
                reserve = UInt64(missing.count)
                continue
            }
            let fresh = readsZeroPastEnd && start >= fileEndCluster
            let blockCount = UInt64(missing.count)
            if blockCount > 0 { try createBlocks(missing, at: start) }
            let dataStart = start + blockCount
            try adjust(cluster: dataStart, count: count, by: 1)
            freeHint = dataStart + count
            fileEndCluster = max(fileEndCluster, dataStart + count)
            return (dataStart << clusterBits, fresh)
        }
    }

    /// Creates empty refcount blocks for table entries `indices` in the free clusters from
    /// `first` on, then counts those clusters (every cluster they take is covered by an
    /// existing block or one of them). Blocks reach the disk before the table points at them.
    private func createBlocks(_ indices: [UInt64], at first: UInt64) throws {
        for (k, index) in indices.enumerated() {
            let offset = (first + UInt64(k)) << clusterBits
            try blocks.install(at: offset, words: [UInt64](repeating: 0, count: Int(clusterSize / 8)))
            table[Int(index)] = offset
        }
        try adjust(cluster: first, count: UInt64(indices.count), by: 1)
        try blocks.flush()
        for index in indices { try writeTableEntry(Int(index)) }
        fileEndCluster = max(fileEndCluster, first + UInt64(indices.count))
    }

    /// Lowers the refcount of `count` clusters from host offset `offset` by one.
    func free(offset: UInt64, count: UInt64 = 1) throws {
        try adjust(cluster: offset >> clusterBits, count: count, by: -1)
    }

    private func findFreeRun(count: UInt64) throws -> UInt64 {
        var start = freeHint
        var length: UInt64 = 0
        var cluster = freeHint
        while length < count {
            let index = cluster / perBlock
            // Past every block and past the file, everything is free.
            if cluster >= fileEndCluster && index >= UInt64(table.count) {
                return length == 0 ? cluster : start
            }
            let block = index < UInt64(table.count) ? table[Int(index)] & qcow2OffsetMask : 0
            if block == 0 {
                // No block: the whole range it would cover is free.
                if length == 0 { start = cluster }
                let blockEnd = (index + 1) * perBlock
                length += blockEnd - cluster
                cluster = blockEnd
                continue
            }
            // Scan this block's entries with one cache lookup.
            let words = try blocks.table(at: block)
            var at = Int(cluster % perBlock)
            while at < Int(perBlock) && length < count {
                if QCOW2TableCache.refcount(in: words, index: at, order: order) == 0 {
                    if length == 0 { start = cluster }
                    length += 1
                } else {
                    length = 0
                }
                at += 1
                cluster += 1
            }
        }
        return start
    }

    /// Moves the refcount table to a larger one that has an entry for `index`: the new table
    /// goes past everything in use, with whatever blocks it needs to describe itself; it is
    /// written in full before the header switches to it, and the old table is freed after.
    private func growTable(toCover index: UInt64) throws {
        let perCluster = clusterSize / 8
        var entries = max(index + 1, UInt64(table.count) * 3 / 2)
        entries = (entries + perCluster - 1) / perCluster * perCluster
        // Place the new table after all blocks and the file end; it may need blocks of its own,
        // which go at the start of their ranges (free by definition) before it.
        var start = max(fileEndCluster, UInt64(table.count) * perBlock)
        var newClusters = entries / perCluster
        var newTable = table + [UInt64](repeating: 0, count: Int(entries) - table.count)
        var pendingBlocks: [(index: UInt64, offset: UInt64)] = []
        while true {
            pendingBlocks = []
            if start % perBlock == 0 { start += 1 }
            let end = start + newClusters
            var i = start / perBlock
            var clash = false
            while i <= (end - 1) / perBlock {
                if i >= UInt64(newTable.count) { break }
                if newTable[Int(i)] == 0 {
                    // A block goes to the first cluster of its range; the table must not cover it.
                    if i * perBlock >= start { clash = true; start = i * perBlock + 1; break }
                    pendingBlocks.append((i, (i * perBlock) << clusterBits))
                }
                i += 1
            }
            if clash { continue }
            let neededEntries = (end - 1) / perBlock + 1
            if neededEntries <= UInt64(newTable.count) { break }
            let grown = (neededEntries + perCluster - 1) / perCluster * perCluster
            newTable += [UInt64](repeating: 0, count: Int(grown) - newTable.count)
            newClusters = grown / perCluster
        }
        let maxTable = QCOW2Header.maxRefcountTableBytes / 8
        guard UInt64(newTable.count) <= maxTable else {
            throw ImageError(path: path, message: "the refcount table would exceed QEMU's limit of \(QCOW2Header.maxRefcountTableBytes) bytes")
        }
        // New blocks (self-describing), then the table clusters' refcounts.
        let order = self.order
        for b in pendingBlocks {
            var words = [UInt64](repeating: 0, count: Int(clusterSize / 8))
            QCOW2TableCache.setRefcount(in: &words, index: 0, order: order, value: 1)
            try blocks.install(at: b.offset, words: words)
            newTable[Int(b.index)] = b.offset
        }
        let oldTable = table
        let oldOffset = tableOffset, oldClusters = tableClusters
        table = newTable  // so adjust() finds the new blocks
        for cluster in start..<(start + newClusters) {
            let blockIndex = cluster / perBlock
            let block = newTable[Int(blockIndex)]
            let at = Int(cluster % perBlock)
            let old = QCOW2TableCache.refcount(in: try blocks.table(at: block), index: at, order: order)
            try blocks.update(at: block) { QCOW2TableCache.setRefcount(in: &$0, index: at, order: order, value: old + 1) }
        }
        do {
            try blocks.flush()
            let newOffset = start << clusterBits
            try file.qcow2Write(QCOW2BE.bytes(newTable), at: newOffset)
            try file.sync()
            tableOffset = newOffset
            tableClusters = newClusters
            try tableMoved?(newOffset, newClusters)
        } catch {
            table = oldTable
            throw error
        }
        fileEndCluster = max(fileEndCluster, start + newClusters)
        for b in pendingBlocks { fileEndCluster = max(fileEndCluster, b.offset >> clusterBits + 1) }
        try free(offset: oldOffset, count: oldClusters)
    }

    private func writeTableEntry(_ index: Int) throws {
        try file.qcow2Write(QCOW2BE.bytes([table[index]]), at: tableOffset + UInt64(index) * 8)
    }

    /// Drops the refcount blocks whose clusters are all free (QEMU's qcow2_shrink_reftable,
    /// after a shrink; a block's own entry does not count). The whole table is written with
    /// their entries zeroed and synced before anything else: only then is a block counted in
    /// another block freed there, and every dropped block's space punched.
    func dropUnusedBlocks() throws {
        try flush()
        var newTable = table
        var dropped: [(index: Int, block: UInt64)] = []
        for (i, entry) in table.enumerated() where entry & qcow2OffsetMask != 0 {
            let block = entry & qcow2OffsetMask
            var words = try blocks.table(at: block)
            let cluster = block >> clusterBits
            if cluster / perBlock == UInt64(i) {
                QCOW2TableCache.setRefcount(in: &words, index: Int(cluster % perBlock), order: order, value: 0)
            }
            if words.allSatisfy({ $0 == 0 }) {
                newTable[i] = 0
                dropped.append((i, block))
            }
        }
        guard !dropped.isEmpty else { return }
        try file.qcow2Write(QCOW2BE.bytes(newTable), at: tableOffset)
        try file.sync()
        table = newTable
        for d in dropped { blocks.forget(d.block) }
        for d in dropped {
            let cluster = d.block >> clusterBits
            if cluster / perBlock != UInt64(d.index) { try adjust(cluster: cluster, by: -1) }
        }
        try flush()
        try file.sync()
        for d in dropped { try? file.punchHole(at: d.block, length: clusterSize) }
    }

    /// Writes every dirty refcount block.
    func flush() throws {
        try blocks.flush()
    }

    private func corrupt(_ message: String) -> ImageError {
        ImageError(path: path, message: "Image is corrupt: " + message)
    }
}
