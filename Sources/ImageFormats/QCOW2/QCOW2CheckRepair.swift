import DiskIO
import Glibc

/// One check pass as QEMU's qcow2_co_check runs it, and the repairs that replace whole
/// structures: rebuilding the refcount table and blocks, clearing the dirty bit.
///
/// Crash safety: every repair writes new data into clusters nothing references (or changes one
/// entry in place) and syncs before the structure that points at it is switched, so an
/// interrupted repair leaves at worst leaked clusters.
extension QCOW2Checker {
    /// Runs one pass on `file` (opened read-write when `repair` is not `.none`).
    static func check(file: DiskFile, path: String, repair: CheckRepair,
                      report: @escaping (String) -> Void,
                      reportError: @escaping (String) -> Void = { _ in }) throws -> ImageCheckResult {
        let checker = try QCOW2Checker(file: file, path: path, repair: repair, report: report)
        checker.reportError = reportError
        try checker.readSnapshotTable()
        do {
            try checker.checkRefcounts()
        } catch var failure as ImageCheckFailure {
            // QEMU adds what the snapshot table read found to a failed refcount pass too.
            let table = checker.snapshotResult
            failure.result.checkErrors += table.checkErrors
            failure.result.corruptions += table.corruptions
            failure.result.corruptionsFixed += table.corruptionsFixed
            throw failure
        }
        try checker.fixSnapshotTable()
        if repair != .none && checker.result.checkErrors == 0 && checker.result.corruptions == 0 {
            try checker.markClean()
        }
        return checker.result
    }

    /// QEMU's qcow2_check_refcounts: walk, compare, repair what `repair` allows, then the
    /// OFLAG_COPIED pass.
    func checkRefcounts() throws {
        result.totalClusters = Int64(clusters(header.size & ~511))
        try calculateRefcounts(fix: repair)
        let beforeCompare = result
        try compareRefcounts(fix: .none)

        if rebuild && repair.fixesErrors {
            let old = result
            var freshLeaks: Int64 = 0
            say("Rebuilding refcount structure")
            do {
                try rebuildRefcountStructure()
            } catch let failure as RebuildFailure {
                result.checkErrors += 1
                throw ImageCheckFailure(errno: EIO, result: result, message: failure.message)
            }
            result.corruptions = 0
            result.leaks = 0
            // Refcounts the old structure could not give (unaligned blocks) are moot now; QEMU
            // keeps them and so leaves the image marked corrupt, simg lets it be marked clean.
            result.checkErrors = beforeCompare.checkErrors
            rebuild = false
            counts.reset()
            try calculateRefcounts(fix: .none)
            // The old structures are leaked now; freeing them is part of the rebuild.
            let saved = result
            result = ImageCheckResult()
            try compareRefcounts(fix: .leaks)
            if rebuild { say("ERROR rebuilt refcount structure is still broken") }
            freshLeaks = result.leaks
            result = saved
            if result.corruptions < old.corruptions { result.corruptionsFixed += old.corruptions - result.corruptions }
            if result.leaks < old.leaks { result.leaksFixed += old.leaks - result.leaks }
            result.leaks += freshLeaks
        } else if repair != .none {
            if rebuild {
                say("ERROR need to rebuild refcount structures")
                result.checkErrors += 1
                throw ImageCheckFailure(errno: EIO, result: result)
            }
            if result.leaks != 0 || result.corruptions != 0 {
                result = beforeCompare
                try compareRefcounts(fix: repair)
            }
        }
        try checkCopiedFlags(fix: repair)
        result.imageEndOffset = (highestCluster + 1) << clusterBits
    }

    // MARK: - Rebuilding the refcount structure

    private var blockBits: UInt64 { clusterBits + 3 - UInt64(header.refcountOrder) }

    /// A rebuild stopped before the header switched to the new structure (the old one is
    /// still in use, untouched where it was counted).
    struct RebuildFailure: Error { var message: String }

    /// Writes part of the new refcount structure after QEMU's overlap check.
    private func writeNew(_ bytes: [UInt8], at offset: UInt64, what: String) throws {
        do {
            try checkOverlap(ignoring: nil, offset: offset, size: UInt64(bytes.count))
            try file.qcow2Write(bytes, at: offset)
        } catch is OverlapRefused {
            throw RebuildFailure(message: "ERROR writing \(what): \(String(cString: strerror(EIO)))")
        } catch let error as IOError {
            throw RebuildFailure(message: "ERROR writing \(what): \(String(cString: strerror(error.code)))")
        }
    }

    /// Writes new refcount blocks and a new refcount table, describing `counts` (plus their
    /// own clusters), into clusters no structure uses, then points the header at them. The
    /// old blocks and table become leaks the caller frees.
    private func rebuildRefcountStructure() throws {
        try stored.flush()
        var table: [UInt64] = []
        var grown = try writeRefcountBlocks(from: 0, to: UInt64(counts.count), table: &table)
        guard grown else {
            // Only when nothing at all was counted (not even the header).
            throw RebuildFailure(message: "ERROR allocating refblock: \(String(cString: strerror(EINVAL)))")
        }
        var tableOffset: UInt64 = 0
        var tableClusters: UInt64 = 0
        repeat {
            tableClusters = clusters(UInt64(table.count) * 8)
            var firstFree: UInt64 = 0
            tableOffset = allocate(tableClusters, firstFree: &firstFree)
            let start = tableOffset >> clusterBits
            grown = try writeRefcountBlocks(from: start, to: start + tableClusters, table: &table)
        } while grown
        guard tableClusters <= UInt64(UInt32.max),
              tableClusters << clusterBits <= QCOW2Header.maxRefcountTableBytes else {
            throw ImageError(path: path, message: "the rebuilt refcount table would be too large")
        }
        var bytes = QCOW2BE.bytes(table)
        bytes.append(contentsOf: [UInt8](repeating: 0, count: Int(tableClusters << clusterBits) - bytes.count))
        try writeNew(bytes, at: tableOffset, what: "reftable")
        // Blocks and table are on disk before the header points at them.
        try file.sync()
        var fields: [UInt8] = []
        QCOW2BE.append64(&fields, tableOffset)
        QCOW2BE.append32(&fields, UInt32(tableClusters))
        try file.qcow2Write(fields, at: 48)
        try file.sync()
        header.refcountTableOffset = tableOffset
        header.refcountTableClusters = UInt32(tableClusters)
        try stored.drop(newTable: table)
        fileLength = (try file.size() + 511) & ~511
    }

    /// Writes a refcount block for every block range in [first, end) holding a nonzero count
    /// (allocating it in the counts themselves); returns whether the table had to grow.
    private func writeRefcountBlocks(from first: UInt64, to end: UInt64, table: inout [UInt64]) throws -> Bool {
        let perBlock = UInt64(1) << blockBits
        let order = Int(header.refcountOrder)
        var grown = false
        var firstFree: UInt64 = 0
        var end = end
        var cluster = first
        while cluster < end {
            if counts[Int(cluster)] == 0 {
                // Pages nothing was counted in are skipped whole (a grown empty tail).
                cluster = UInt64(counts.nextCandidate(after: Int(cluster)))
                continue
            }
            let index = cluster >> blockBits
            let blockStart = index << blockBits
            var offset: UInt64
            if UInt64(table.count) > index && table[Int(index)] != 0 {
                offset = table[Int(index)]
            } else {
                // Never allocate inside a range whose block is already written.
                firstFree = max(firstFree, blockStart)
                offset = allocate(1, firstFree: &firstFree)
                if offset >> clusterBits >= end { end = (offset >> clusterBits) + 1 }
                if UInt64(table.count) <= index {
                    let perCluster = clusterSize / 8
                    let entries = (index + 1 + perCluster - 1) / perCluster * perCluster
                    table.append(contentsOf: repeatElement(0, count: Int(entries) - table.count))
                    grown = true
                }
                table[Int(index)] = offset
            }
            // Nothing points at the new blocks yet: stopping here only leaves them unused.
            try stopIfInterrupted()
            var words = [UInt64](repeating: 0, count: Int(clusterSize / 8))
            for k in 0..<perBlock {
                let value = counts[Int(blockStart + k)]
                if value != 0 { QCOW2TableCache.setRefcount(in: &words, index: Int(k), order: order, value: value) }
            }
            try writeNew(QCOW2BE.bytes(words), at: offset, what: "refblock")
            cluster = blockStart + perBlock
        }
        return grown
    }

    /// First fit of `count` clusters the counts show free, from `firstFree` (QEMU's
    /// alloc_clusters_imrt); past the end of the counts everything is free.
    private func allocate(_ count: UInt64, firstFree: inout UInt64) -> UInt64 {
        var cluster = firstFree
        var contiguous: UInt64 = 0
        var firstGap = true
        while cluster < UInt64(counts.count) && contiguous < count {
            if counts[Int(cluster)] == 0 {
                contiguous += 1
                if firstGap {
                    firstFree = cluster
                    firstGap = false
                }
            } else {
                contiguous = 0
            }
            cluster += 1
        }
        if contiguous < count { counts.grow(to: Int(cluster + count - contiguous)) }
        cluster -= contiguous
        for i in 0..<count { counts.set(Int(cluster + i), 1) }
        return cluster << clusterBits
    }

    // MARK: - Header bits

    /// Clears the dirty bit (lazy refcounts) and the corrupt bit once the image checked clean.
    func markClean() throws {
        let clear = QCOW2Header.incompatibleDirty | QCOW2Header.incompatibleCorrupt
        guard header.version >= 3, header.incompatibleFeatures & clear != 0 else { return }
        try file.sync()
        header.incompatibleFeatures &= ~clear
        var field: [UInt8] = []
        QCOW2BE.append64(&field, header.incompatibleFeatures)
        try file.qcow2Write(field, at: 72)
        try file.sync()
    }
}
