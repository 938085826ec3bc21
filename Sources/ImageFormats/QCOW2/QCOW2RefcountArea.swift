import DiskIO
import Glibc

/// QEMU 7.2's qcow2_refcount_area with exact_size, which a falloc/full resize uses before it
/// lays out the new data clusters: at `start` (the end of what the image uses) go the refcount
/// blocks still missing to cover everything up to `additional` clusters past it, then a whole
/// new refcount table of exactly the entries needed; the area's own clusters are counted.
/// Crash order: the blocks (new ones at fresh offsets; raising refcounts of free clusters in
/// old ones is at worst a leak) are written, then the table, synced, then one 12-byte header
/// write switches to it (`tableMoved`), synced; only then is the old table freed.
extension QCOW2Refcounts {
    /// qcow2_refcount_metadata_size without the generous increase: the refcount blocks that
    /// cover `clusters` clusters plus the blocks and table themselves (a fixed point).
    static func exactRefblockCount(clusters: UInt64, clusterSize: UInt64, perBlock: UInt64) -> UInt64 {
        let perTableCluster = clusterSize / 8
        var table: UInt64 = 0, blocks: UInt64 = 0, n: UInt64 = 0, last: UInt64
        repeat {
            last = n
            blocks = (clusters + table + blocks + perBlock - 1) / perBlock
            table = (blocks + perTableCluster - 1) / perTableCluster
            n = clusters + blocks + table
        } while n != last
        return blocks
    }

    /// Creates the area at host offset `start` (cluster aligned, nothing in use from there on)
    /// and returns where it ends: the first free offset after the new table.
    func createArea(at start: UInt64, additional: UInt64) throws -> UInt64 {
        let cs = clusterSize
        let startCluster = start >> clusterBits
        let total = Self.exactRefblockCount(clusters: startCluster + additional, clusterSize: cs, perBlock: perBlock)
        let perCluster = cs / 8
        let entries = (total + perCluster - 1) / perCluster * perCluster
        // QEMU's limit on the table (EFBIG), checked before anything is written.
        guard entries * 8 <= QCOW2Header.maxRefcountTableBytes else {
            throw AreaError(message: "Failed to resize refcount structures: \(String(cString: strerror(EFBIG)))")
        }
        var newTable = [UInt64](repeating: 0, count: Int(entries))
        // The table may even shrink (QEMU's "improbable case"): entries past it describe
        // nothing in use, as everything past `start` is free.
        let keep = min(table.count, Int(entries))
        newTable.replaceSubrange(0..<keep, with: table[0..<keep])
        var newBlocks: [UInt64] = []
        var offset = start
        for i in Int(startCluster / perBlock)..<Int(total) where newTable[i] & qcow2OffsetMask == 0 {
            newTable[i] = offset
            newBlocks.append(offset)
            offset += cs
        }
        let tableOffset = offset
        let newClusters = entries / perCluster
        let end = tableOffset + newClusters * cs
        for b in newBlocks { try blocks.install(at: b, words: [UInt64](repeating: 0, count: Int(cs / 8))) }
        let oldTable = table, oldOffset = self.tableOffset, oldClusters = tableClusters
        table = newTable  // so adjust() finds the new blocks
        var switching = false
        do {
            try adjust(cluster: startCluster, count: (end - start) >> clusterBits, by: 1)
            try blocks.flush()
            try file.qcow2Write(QCOW2BE.bytes(newTable), at: tableOffset)
            try file.sync()
            switching = true
            try tableMoved?(tableOffset, newClusters)
        } catch let error as InterruptedError where switching {
            // SIGINT/SIGTERM at the sync after the header write: the new table is the image's
            // (the old one stays allocated: a leak). Nothing may be given back.
            self.tableOffset = tableOffset
            tableClusters = newClusters
            fileEndCluster = max(fileEndCluster, end >> clusterBits)
            throw error
        } catch {
            // Not switched: the new blocks are unreachable again, and the area's refcounts
            // in old blocks go back down (should that fail too, they are leaks, no more).
            for c in startCluster..<(end >> clusterBits) {
                let i = Int(c / perBlock)
                if i < oldTable.count && oldTable[i] & qcow2OffsetMask != 0,
                   (try? refcount(ofCluster: c)) ?? 0 > 0 { try? adjust(cluster: c, by: -1) }
            }
            try? blocks.flush()
            table = oldTable
            for b in newBlocks { blocks.forget(b) }
            throw error
        }
        self.tableOffset = tableOffset
        tableClusters = newClusters
        fileEndCluster = max(fileEndCluster, end >> clusterBits)
        try free(offset: oldOffset, count: oldClusters)
        return end
    }

    /// A failure QEMU reports in its own words (the resize passes it on as such).
    struct AreaError: Error { let message: String }
}
