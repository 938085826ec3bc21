import DiskIO
import Glibc

/// A change of the refcount width (amend refcount_bits=N, QEMU's qcow2_change_refcount_order),
/// crash-safe as every QCOW2MetadataSwitch: the new refcount table and blocks are written whole
/// into clusters that are free in the current image (found by the switch's first-fit search,
/// not counted in the current refcounts), synced, and one write of header bytes 48..<100
/// switches table, table size and refcount_order together. A kill before it leaves the old
/// image (garbage in free clusters only), after it the new one. The new refcounts are the
/// old ones with the old table and blocks at 0 and the new ones at 1: nothing leaks, and every
/// other cluster (L1, L2, data, snapshot tables, bitmap directory, tables and data) keeps its
/// count. The old structures' space is given back after the switch (best effort).
///
/// Memory: one block of the new width at a time; the old refcounts are read through their
/// block cache.
extension QCOW2Image {
    func rebuildRefcounts(order newOrder: UInt32) throws {
        try flush()
        // The writer's refcount state describes the old width: gone after the switch.
        writeState = nil
        let sw = try QCOW2MetadataSwitch(image: self)
        let old = sw.old
        let bits = UInt64(header.clusterBits), cs = UInt64(clusterSize)
        let width = UInt64(1) << UInt64(newOrder)
        let perBlock = cs * 8 / width
        let maxValue: UInt64 = newOrder == 6 ? .max : (UInt64(1) << width) - 1
        let usedEnd = try old.usedClusterEnd(fileSize: try file.size())
        var oldMeta = Set<UInt64>()
        for c in 0..<old.tableClusters { oldMeta.insert((old.tableOffset >> bits) + c) }
        for entry in old.table where entry & qcow2OffsetMask != 0 { oldMeta.insert((entry & qcow2OffsetMask) >> bits) }

        // The refcount `cluster` has after the switch, not counting the new structures.
        func newRefcount(_ cluster: UInt64) throws -> UInt64 {
            let value = try old.refcount(ofCluster: cluster)
            return value != 0 && oldMeta.contains(cluster) ? value - 1 : value
        }
        // A narrower width must hold every refcount: checked before anything is written.
        if width < UInt64(header.refcountBits) {
            for c in 0..<usedEnd {
                let value = try newRefcount(c)
                if value > maxValue {
                    throw AmendError("Cannot decrease refcount entry width to \(width) bits: Cluster at offset \(QCOW2BE.hex(c << bits)) has a refcount of \(value)")
                }
            }
        }

        // Placement: the table (contiguous) then one cluster per block, until the blocks cover
        // every cluster in use, the new structures' own included.
        var blockCount = max(1, (usedEnd + perBlock - 1) / perBlock)
        var tableStart: UInt64 = 0, tableClusters: UInt64 = 0
        var blockClusters: [UInt64] = []
        while true {
            tableClusters = max(1, (blockCount * 8 + cs - 1) / cs)
            tableStart = try sw.freeRun(count: tableClusters, restart: true)
            blockClusters = try (0..<blockCount).map { _ in try sw.freeRun(count: 1) }
            let end = max(usedEnd, tableStart + tableClusters, (blockClusters.max() ?? 0) + 1)
            let needed = (end + perBlock - 1) / perBlock
            if needed <= blockCount { break }
            blockCount = needed
        }
        guard tableClusters * cs <= QCOW2Header.maxRefcountTableBytes else {
            throw AmendError("Failed to change the refcount order: the refcount table would exceed \(QCOW2Header.maxRefcountTableBytes) bytes")
        }
        let newMeta = Array(tableStart..<(tableStart + tableClusters)) + blockClusters

        do {
            var table = [UInt64](repeating: 0, count: Int(tableClusters * cs / 8))
            var words = [UInt64](repeating: 0, count: Int(cs / 8))
            for (j, host) in blockClusters.enumerated() {
                try Interruption.check(image: path, outcome: "keeps its old refcount width")
                for i in words.indices { words[i] = 0 }
                let first = UInt64(j) * perBlock
                var c = first
                while c < min(first + perBlock, usedEnd) {
                    let value = try newRefcount(c)
                    if value != 0 {
                        guard value <= maxValue else { throw AmendError("refcount of cluster \(c) does not fit \(width) bits") }
                        QCOW2TableCache.setRefcount(in: &words, index: Int(c - first), order: Int(newOrder), value: value)
                    }
                    c += 1
                }
                for m in newMeta where m >= first && m < first + perBlock {
                    QCOW2TableCache.setRefcount(in: &words, index: Int(m - first), order: Int(newOrder), value: 1)
                }
                try file.qcow2Write(QCOW2BE.bytes(words), at: host << bits)
                table[j] = host << bits
            }
            try file.qcow2Write(QCOW2BE.bytes(table), at: tableStart << bits)
            try file.sync()
            try Interruption.check(image: path, outcome: "keeps its old refcount width")
            try sw.switchRefcounts(tableOffset: tableStart << bits, tableClusters: UInt32(tableClusters),
                                   order: newOrder, header: &header)
        } catch let error as IOError {
            // Before the switch the image is unchanged; once the header write was issued the
            // new structures may be in use, so nothing is cut.
            if header.refcountOrder != newOrder { sw.abandon() }
            throw ImageError(path: path, message: "Failed to change the refcount order", cause: error)
        } catch {
            if header.refcountOrder != newOrder { sw.abandon() }
            throw error
        }
        // Nothing references the old table and blocks now: give their space back.
        if !(try file.kind().isDevice) {
            for c in oldMeta.sorted() { try? file.punchHole(at: c << bits, length: cs) }
        }
    }
}
