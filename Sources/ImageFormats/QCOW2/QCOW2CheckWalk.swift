import DiskIO
import Glibc

/// The reference walk: every structure the header reaches counts its clusters (QEMU's
/// calculate_refcounts, in the same order so messages come out in QEMU's order).
extension QCOW2Checker {
    func calculateRefcounts(fix: CheckRepair) throws {
        reference(0, clusterSize)  // header
        try checkL1(offset: header.l1TableOffset, size: UInt64(header.l1Size), fragmentInfo: true, fix: fix, active: true)

        if header.hasDataFile && !snapshots.isEmpty {
            say("ERROR \(snapshots.count) snapshots in image with data file")
            result.corruptions += 1
        }
        for s in snapshots {
            if intoCluster(s.l1TableOffset) != 0 {
                say("ERROR snapshot \(s.id) (\(s.name)) l1_offset=0x\(Self.hex(s.l1TableOffset)): L1 table is not cluster aligned; snapshot table entry corrupted")
                result.corruptions += 1
                continue
            }
            if UInt64(s.l1Size) > QCOW2Header.maxL1Bytes / 8 {
                say("ERROR snapshot \(s.id) (\(s.name)) l1_size=0x\(Self.hex(UInt64(s.l1Size))): L1 table is too large; snapshot table entry corrupted")
                result.corruptions += 1
                continue
            }
            try checkL1(offset: s.l1TableOffset, size: UInt64(s.l1Size), fragmentInfo: false, fix: fix, active: false)
        }
        reference(header.snapshotsOffset, UInt64(snapshots.reduce(0) { $0 + $1.entrySize }))
        reference(header.refcountTableOffset, UInt64(header.refcountTableClusters) << clusterBits)
        try referenceBitmaps()
        try checkRefcountBlocks(fix: fix)
    }

    /// One L1 table and the L2 tables it points at (QEMU's check_refcounts_l1).
    private func checkL1(offset: UInt64, size: UInt64, fragmentInfo: Bool, fix: CheckRepair, active: Bool) throws {
        guard size > 0 else { return }
        reference(offset, size * 8)
        let entries = QCOW2BE.words(try file.qcow2ReadBytes(count: Int(size) * 8, at: offset))
        let tableBytes = Int(clusterSize)
        var reader = QCOW2TableReader(file: file, tableBytes: tableBytes, offsets: entries.map { $0 & qcow2OffsetMask })
        for (i, entry) in entries.enumerated() where entry != 0 {
            try stopIfInterrupted()
            if entry & QCOW2CheckMask.l1Reserved != 0 {
                say("ERROR found L1 entry with reserved bits set: \(Self.hex(entry))")
                result.corruptions += 1
            }
            let l2Offset = entry & qcow2OffsetMask
            reference(l2Offset, clusterSize)
            if intoCluster(l2Offset) != 0 {
                say("ERROR l2_offset=\(Self.hex(l2Offset)): Table is not cluster aligned; L1 entry corrupted")
                result.corruptions += 1
            }
            let table = try reader.table(at: i)
            try checkL2(table, at: l2Offset, fragmentInfo: fragmentInfo, fix: fix)
        }
    }

    /// One L2 table (QEMU's check_refcounts_l2).
    private func checkL2(_ table: [UInt8], at l2Offset: UInt64, fragmentInfo: Bool, fix: CheckRepair) throws {
        let extended = header.hasExtendedL2
        let entrySize = extended ? 16 : 8
        let entries = Int(clusterSize) / entrySize
        let dataFile = header.hasDataFile
        let shift = QCOW2CompressedDescriptor.sectorShift(clusterBits: header.clusterBits)
        let offsetMask = (UInt64(1) << shift) - 1
        let sectorsMask = (UInt64(1) << (clusterBits - 8)) - 1
        var nextContiguous: UInt64 = 0
        // The common case (an aligned data cluster inside the file) is counted inline with
        // these locals; everything else goes through `reference`.
        let fileEnd = fileLength
        let limit = UInt64(counts.limit)
        var allocated: Int64 = 0, fragmented: Int64 = 0
        var known = counts.count
        defer {
            result.allocatedClusters += allocated
            result.fragmentedClusters += fragmented
        }
        try table.withUnsafeBytes { raw in
        for i in 0..<entries {
            // Sound: (i + 1) * entrySize <= clusterSize == raw.count.
            var entry = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * entrySize, as: UInt64.self))
            if entry == 0 && !extended { continue }
            let bitmap = extended ? UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * entrySize + 8, as: UInt64.self)) : 0
            let type = clusterType(entry)
            if type != .compressed && entry & QCOW2CheckMask.l2Reserved != 0 {
                say("ERROR found l2 entry with reserved bits set: \(Self.hex(entry))")
                result.corruptions += 1
            }
            switch type {
            case .compressed:
                if entry & qcow2CopiedFlag != 0 {
                    say("ERROR: coffset=0x\(Self.hex(entry & offsetMask)): copied flag must never be set for compressed clusters")
                    entry &= ~qcow2CopiedFlag
                    result.corruptions += 1
                }
                if dataFile {
                    say("ERROR compressed cluster \(i) with data file, entry=0x\(Self.hex(entry))")
                    result.corruptions += 1
                    continue
                }
                if bitmap != 0 {
                    say("ERROR compressed cluster \(i) with non-zero subcluster allocation bitmap, entry=0x\(Self.hex(entry))")
                    result.corruptions += 1
                    continue
                }
                let hostOffset = entry & offsetMask
                let sectors = ((entry >> shift) & sectorsMask) + 1
                reference(hostOffset, sectors * 512 - (hostOffset & 511))
                known = counts.count
                if fragmentInfo {
                    allocated += 1
                    result.compressedClusters += 1
                    fragmented += 1
                }
            case .normal, .zeroAllocated:
                let offset = entry & qcow2OffsetMask
                if (bitmap >> 32) & bitmap != 0 {
                    result.corruptions += 1
                    say("ERROR offset=\(Self.hex(offset)): Allocated cluster has corrupted subcluster allocation bitmap")
                }
                if intoCluster(offset) != 0 {
                    result.corruptions += 1
                    let containsData = extended ? bitmap & QCOW2CheckMask.allAllocated != 0 : entry & qcow2ZeroFlag == 0
                    if !containsData {
                        say("\(fix.fixesErrors ? "Repairing" : "ERROR") offset=\(Self.hex(offset)): Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        if fix.fixesErrors {
                            // Made a plain zero cluster: it reads the same (zeros) and points nowhere.
                            let at = l2Offset + UInt64(i * entrySize)
                            do {
                                try checkOverlap(ignoring: fragmentInfo ? .activeL2 : nil, offset: at, size: UInt64(entrySize))
                            } catch is OverlapRefused {
                                say("ERROR: Overlap check failed")
                                result.checkErrors += 1
                                throw ImageCheckFailure(errno: EIO, result: result)
                            }
                            var patch: [UInt8] = []
                            QCOW2BE.append64(&patch, extended ? 0 : qcow2ZeroFlag)
                            try file.qcow2Write(patch, at: at)
                            try file.sync()
                            result.corruptions -= 1
                            result.corruptionsFixed += 1
                            continue
                        }
                    } else {
                        say("ERROR offset=\(Self.hex(offset)): Data cluster is not properly aligned; L2 entry corrupted.")
                    }
                }
                if fragmentInfo {
                    allocated += 1
                    if nextContiguous != 0 && offset != nextContiguous {
                        fragmented += 1
                    }
                    nextContiguous = offset &+ clusterSize
                }
                if !dataFile {
                    let cluster = Int(offset >> clusterBits)
                    if offset & (clusterSize - 1) == 0 && offset + clusterSize <= fileEnd && cluster < known,
                       let entry = counts.slot(cluster), UInt64(entry.pointee) < limit {
                        // Sound: cluster < known == counts.count, so slot gave a valid entry.
                        entry.pointee += 1
                    } else {
                        reference(offset, clusterSize)
                        known = counts.count
                    }
                }
            case .zeroPlain:
                break
            case .unallocated:
                if bitmap & QCOW2CheckMask.allAllocated != 0 {
                    result.corruptions += 1
                    say("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                }
            }
        }
        }
    }

    enum ClusterType { case unallocated, zeroPlain, zeroAllocated, normal, compressed }

    /// QEMU's qcow2_get_cluster_type (offset 0 with COPIED is a real cluster in a data file).
    func clusterType(_ entry: UInt64) -> ClusterType {
        if entry & qcow2CompressedFlag != 0 { return .compressed }
        if entry & qcow2ZeroFlag != 0 && !header.hasExtendedL2 {
            return entry & qcow2OffsetMask != 0 ? .zeroAllocated : .zeroPlain
        }
        if entry & qcow2OffsetMask == 0 {
            return header.hasDataFile && entry & qcow2CopiedFlag != 0 ? .normal : .unallocated
        }
        return .normal
    }

    /// The persistent bitmaps' directory, tables and data clusters (only when the autoclear
    /// bit says the bitmaps extension is valid, as QEMU loads it).
    private func referenceBitmaps() throws {
        guard header.autoclearFeatures & QCOW2Header.autoclearBitmaps != 0,
              let ext = header.bitmapsExtension, ext.count >= 24 else { return }
        let count = QCOW2BE.u32(ext, 0)
        let directorySize = QCOW2BE.u64(ext, 8)
        let directoryOffset = QCOW2BE.u64(ext, 16)
        guard count > 0 else { return }
        reference(directoryOffset, directorySize)
        // QEMU refuses directories over 64 MiB when it opens the image.
        guard directorySize <= 64 << 20 else {
            result.corruptions += 1
            return
        }
        let directory = try file.qcow2ReadBytes(count: Int(directorySize), at: directoryOffset)
        var at = 0
        for _ in 0..<count {
            guard at + 24 <= directory.count else { result.corruptions += 1; return }
            let tableOffset = QCOW2BE.u64(directory, at)
            let tableSize = UInt64(QCOW2BE.u32(directory, at + 8))
            let nameSize = Int(QCOW2BE.u16(directory, at + 18))
            let extraSize = Int(QCOW2BE.u32(directory, at + 20))
            at += (24 + extraSize + nameSize + 7) & ~7
            reference(tableOffset, tableSize * 8)
            guard tableSize * 8 <= 64 << 20, intoCluster(tableOffset) == 0 else {
                result.corruptions += 1
                break
            }
            let table = QCOW2BE.words(try file.qcow2ReadBytes(count: Int(tableSize) * 8, at: tableOffset))
            for entry in table {
                let offset = entry & qcow2OffsetMask
                if entry & QCOW2CheckMask.bitmapReserved != 0 || intoCluster(offset) != 0
                    || (entry & 1 != 0 && offset != 0) {
                    result.corruptions += 1
                    continue
                }
                if offset != 0 { reference(offset, clusterSize) }
            }
        }
    }

    /// The refcount blocks themselves (QEMU's check_refblocks): each must be aligned, inside
    /// the file and referenced exactly once; otherwise the structure needs rebuilding.
    private func checkRefcountBlocks(fix: CheckRepair) throws {
        for (i, raw) in stored.table.enumerated() {
            let offset = raw & QCOW2CheckMask.reftableOffset
            let cluster = offset >> clusterBits
            if raw & QCOW2CheckMask.reftableReserved != 0 {
                say("ERROR refcount table entry \(i) has reserved bits set")
                result.corruptions += 1
                rebuild = true
                continue
            }
            if intoCluster(offset) != 0 {
                say("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                result.corruptions += 1
                rebuild = true
                continue
            }
            if cluster >= UInt64(counts.count) {
                result.corruptions += 1
                say("\(fix.fixesErrors ? "Repairing" : "ERROR") refcount block \(i) is outside image")
                if fix.fixesErrors {
                    // Growing the file to hold the block makes it a (zeroed) block again.
                    let (end, overflow) = offset.addingReportingOverflow(clusterSize)
                    var failure = "Invalid argument"
                    if !overflow, !growthLeavesUsableImage(to: end) {
                        // QEMU grows anyway and leaves a file it then refuses to open or check;
                        // simg treats the entry as corrupt and the rebuild replaces it.
                        rebuild = true
                        say("ERROR could not resize image: \(String(cString: strerror(EFBIG)))")
                        continue
                    }
                    if !overflow, end <= UInt64(Int64.max) {
                        do {
                            try file.truncate(to: end)
                        } catch let error as IOError {
                            failure = String(cString: strerror(error.code))
                            reportError("Could not resize file: \(failure)")
                            rebuild = true
                            say("ERROR could not resize image: \(failure)")
                            continue
                        } catch let error as DeviceSizeError {
                            // A device cannot grow: QEMU's host_device says so, with EINVAL.
                            reportError("\(error)")
                            rebuild = true
                            say("ERROR could not resize image: \(failure)")
                            continue
                        }
                        fileLength = (try file.size() + 511) & ~511
                        guard counts.grow(to: Int(clusters(fileLength))) else {
                            // As QEMU when its refcount array cannot follow the file: the check fails.
                            result.checkErrors += 1
                            throw ImageCheckFailure(errno: ENOMEM, result: result)
                        }
                        result.corruptions -= 1
                        result.corruptionsFixed += 1
                        reference(offset, clusterSize)
                        continue
                    }
                    rebuild = true
                    say("ERROR could not resize image: \(failure)")
                }
                continue
            }
            if offset != 0 {
                reference(offset, clusterSize)
                let n = counts[Int(cluster)]
                if n != 1 {
                    say("ERROR refcount block \(i) refcount=\(n)")
                    result.corruptions += 1
                    rebuild = true
                }
            }
        }
    }
}

extension QCOW2Checker {
    /// Whether growing the file to `end` for a refcount block past its end (QEMU's repair of
    /// "refcount block outside image") leaves an image QEMU can still open and check: the
    /// refcount table covering the grown file within QEMU's 8 MiB ("Reference count table too
    /// large" at open) and at most INT_MAX clusters ("Check failed: File too large"). The
    /// rebuild that follows a growth must cover the block's cluster, so past either bound the
    /// result is unusable; below them simg grows exactly as QEMU does.
    func growthLeavesUsableImage(to end: UInt64) -> Bool {
        let lastCluster = (end - 1) >> clusterBits
        guard lastCluster < UInt64(Int32.max) else { return false }
        let tableBytes = ((lastCluster >> stored.blockBits) + 1) * 8
        let tableClusters = (tableBytes + clusterSize - 1) >> clusterBits
        return tableClusters << clusterBits <= QCOW2Header.maxRefcountTableBytes
    }
}

/// Reads the L2 tables of one L1 table, merging tables that lie back to back on disk (in L1
/// order) into one request of up to 8 MiB.
struct QCOW2TableReader {
    let file: DiskFile
    let tableBytes: Int
    let offsets: [UInt64]
    private var bufferStart = 0
    private var bufferCount = 0
    private var buffer: [UInt8] = []
    static let maxRequest = 8 << 20

    init(file: DiskFile, tableBytes: Int, offsets: [UInt64]) {
        self.file = file
        self.tableBytes = tableBytes
        self.offsets = offsets
    }

    /// The table of L1 entry `index` (zeros past the end of the file).
    mutating func table(at index: Int) throws -> [UInt8] {
        if index < bufferStart || index >= bufferStart + bufferCount {
            var n = 1
            let first = offsets[index]
            let aligned = first % UInt64(tableBytes) == 0
            while aligned, index + n < offsets.count, (n + 1) * tableBytes <= Self.maxRequest,
                  offsets[index + n] == first + UInt64(n * tableBytes) {
                n += 1
            }
            buffer = try file.qcow2ReadBytes(count: n * tableBytes, at: first)
            bufferStart = index
            bufferCount = n
        }
        let from = (index - bufferStart) * tableBytes
        return Array(buffer[from..<(from + tableBytes)])
    }
}
