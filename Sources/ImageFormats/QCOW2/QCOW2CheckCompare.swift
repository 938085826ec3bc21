import DiskIO
import Glibc

/// Stored refcounts against the references found (QEMU's compare_refcounts), and the
/// OFLAG_COPIED flags against the stored refcounts (check_oflag_copied).
extension QCOW2Checker {
    /// Compares every cluster; with `fix`, lowers leaked counts (leaks) and raises too-low
    /// nonzero counts (all). A used cluster counted 0 needs a rebuild.
    func compareRefcounts(fix: CheckRepair) throws {
        highestCluster = 0
        let perBlock = 1 << Int(stored.blockBits)
        let order = stored.order
        let total = counts.count
        var blockStart = 0
        while blockStart < total {
            let blockEnd = min(blockStart + perBlock, total)
            let index = blockStart / perBlock
            if stored.hasNoBlock(index) && counts.allZero(blockStart..<blockEnd) {
                // Nothing stored, nothing found: a stretch of the file no structure uses (a
                // repair's grown tail costs this test per block, nothing more).
                blockStart = blockEnd
                continue
            }
            try stopIfInterrupted()
            let block = try stored.block(index)
            if case .unaligned = block {
                for i in blockStart..<blockEnd {
                    say("Can't get refcount for cluster \(i): \(String(cString: strerror(EIO)))")
                    result.checkErrors += 1
                }
                blockStart = blockEnd
                continue
            }
            var mismatches: [Int] = []
            var highest = -1
            if case .bytes(let bytes) = block {
                for i in blockStart..<blockEnd {
                    let found = counts[i]
                    let value = QCOW2RefcountEntry.get(bytes, i - blockStart, order: order)
                    if value | found != 0 { highest = i }
                    if value != found { mismatches.append(i) }
                }
            } else {
                var i = blockStart
                while i < blockEnd {
                    if counts[i] != 0 {
                        highest = i
                        mismatches.append(i)
                    }
                    i = counts.nextCandidate(after: i)
                }
            }
            if highest >= 0 { highestCluster = UInt64(highest) }
            for i in mismatches { try mismatch(UInt64(i), fix: fix) }
            blockStart = blockEnd
        }
        try stored.flush()
        if fix != .none { try file.sync() }
    }

    /// One cluster whose stored refcount differs from the references found.
    private func mismatch(_ cluster: UInt64, fix: CheckRepair) throws {
        let stored = try self.stored.refcount(of: cluster) ?? 0
        let found = counts[Int(cluster)]
        var fixesLeak = false, fixesError = false
        if stored == 0 {
            rebuild = true
        } else if stored > found && fix.fixesLeaks {
            fixesLeak = true
        } else if stored < found && fix.fixesErrors {
            fixesError = true
        }
        let word = fixesLeak || fixesError ? "Repairing" : (stored < found ? "ERROR" : "Leaked")
        say("\(word) cluster \(cluster) refcount=\(stored) reference=\(found)")
        if fixesLeak || fixesError, try self.stored.setRefcount(of: cluster, to: found) {
            if fixesLeak { result.leaksFixed += 1 } else { result.corruptionsFixed += 1 }
            return
        }
        if stored < found { result.corruptions += 1 } else { result.leaks += 1 }
    }

    /// The COPIED flag of each active L1 entry and of each active L2 entry must be set exactly
    /// when the cluster's refcount is 1. Repaired with -r all, and with -r leaks when nothing
    /// else is wrong (the refcounts are then known to be right).
    func checkCopiedFlags(fix: CheckRepair) throws {
        let repair = fix.fixesErrors
            || (fix.fixesLeaks && result.checkErrors == 0 && result.corruptions == 0 && result.leaks == 0)
        let extended = header.hasExtendedL2
        let entrySize = extended ? 16 : 8
        let entries = Int(clusterSize) / entrySize
        var reader = QCOW2TableReader(file: file, tableBytes: Int(clusterSize), offsets: l1.map { $0 & qcow2OffsetMask })
        for i in l1.indices {
            let l1Entry = l1[i]
            let l2Offset = l1Entry & qcow2OffsetMask
            if l2Offset == 0 { continue }
            try stopIfInterrupted()
            guard let refcount = try stored.refcount(of: l2Offset >> clusterBits) else { continue }
            if (refcount == 1) != (l1Entry & qcow2CopiedFlag != 0) {
                result.corruptions += 1
                say("\(repair ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(Self.hex(l1Entry)) refcount=\(refcount)")
                if repair {
                    let fixed = refcount == 1 ? l1Entry | qcow2CopiedFlag : l1Entry & ~qcow2CopiedFlag
                    do {
                        try checkOverlap(ignoring: .activeL1, offset: header.l1TableOffset + UInt64(i) * 8, size: 8)
                    } catch is OverlapRefused {
                        result.checkErrors += 1
                        throw ImageCheckFailure(errno: EIO, result: result)
                    }
                    var patch: [UInt8] = []
                    QCOW2BE.append64(&patch, fixed)
                    try file.qcow2Write(patch, at: header.l1TableOffset + UInt64(i) * 8)
                    try file.sync()
                    l1[i] = fixed
                    result.corruptions -= 1
                    result.corruptionsFixed += 1
                }
            }
            var table = try reader.table(at: i)
            var changed = 0
            // The stored refcount block of the data clusters, looked up once per block.
            var blockIndex = -1
            var block = QCOW2StoredBlock.none
            let blockBits = stored.blockBits, order = stored.order
            let withinMask = (UInt64(1) << blockBits) - 1
            for j in 0..<entries {
                let entry = QCOW2BE.u64(table, j * entrySize)
                if entry == 0 { continue }
                let type = clusterType(entry)
                guard type == .normal || type == .zeroAllocated else { continue }
                var dataRefcount: UInt64 = 1
                if !header.hasDataFile {
                    let cluster = (entry & qcow2OffsetMask) >> clusterBits
                    let index = Int(cluster >> blockBits)
                    if index != blockIndex {
                        block = try stored.block(index)
                        blockIndex = index
                    }
                    switch block {
                    case .none: dataRefcount = 0
                    case .unaligned: continue
                    case .bytes(let b): dataRefcount = QCOW2RefcountEntry.get(b, Int(cluster & withinMask), order: order)
                    }
                }
                if (dataRefcount == 1) != (entry & qcow2CopiedFlag != 0) {
                    result.corruptions += 1
                    say("\(repair ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(Self.hex(entry)) refcount=\(dataRefcount)")
                    if repair {
                        let fixed = dataRefcount == 1 ? entry | qcow2CopiedFlag : entry & ~qcow2CopiedFlag
                        QCOW2BE.put64(&table, j * entrySize, fixed)
                        changed += 1
                    }
                }
            }
            if changed > 0 {
                do {
                    try checkOverlap(ignoring: .activeL2, offset: l2Offset, size: clusterSize)
                } catch is OverlapRefused {
                    say("ERROR: Could not write L2 table; metadata overlap check failed: \(String(cString: strerror(EIO)))")
                    result.checkErrors += 1
                    throw ImageCheckFailure(errno: EIO, result: result)
                }
                try file.qcow2Write(table, at: l2Offset)
                try file.sync()
                result.corruptions -= Int64(changed)
                result.corruptionsFixed += Int64(changed)
            }
        }
    }
}
