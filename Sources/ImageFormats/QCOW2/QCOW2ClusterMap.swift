import DiskIO

/// A run of guest bytes with one mapping, as `lookup` returns it.
struct QCOW2Run: Equatable {
    /// For `.normal`, the host offset (in the data file) of the run's first byte, which may be
    /// inside a cluster; the run is host-contiguous. For `.compressed`, the run stays inside
    /// one guest cluster.
    var kind: QCOW2ClusterKind
    var length: UInt64
}

/// What classifying an L2 entry needs of the header, read once per table walk: the header is
/// a stored property of the image (a class), so reading it per entry costs an exclusivity check
/// each time, which was a large part of map's and measure's time on a 4 GiB image.
struct QCOW2EntryRules {
    let clusterSize: UInt64
    let clusterBits: UInt32
    let extended: Bool
    let hasDataFile: Bool
    let version: UInt32
    /// Guest bytes per unit of status: the subcluster size with extended L2 entries, else the
    /// cluster size.
    let granule: UInt64
    let subclustersPerCluster: UInt64
    /// Guest bytes one L2 table maps.
    let tableSpan: UInt64

    init(_ header: QCOW2Header) {
        clusterSize = UInt64(header.clusterSize)
        clusterBits = header.clusterBits
        extended = header.hasExtendedL2
        hasDataFile = header.hasDataFile
        version = header.version
        granule = UInt64(header.subclusterSize)
        subclustersPerCluster = UInt64(header.subclustersPerCluster)
        tableSpan = header.bytesPerL2Table
    }
}

extension QCOW2Image {
    /// Guest bytes per L2 table entry's unit of status: the subcluster size with extended L2
    /// entries, else the cluster size.
    var granuleSize: UInt64 { UInt64(header.subclusterSize) }

    /// The host offset of the L2 table covering `guestOffset`, or 0 when none is allocated.
    /// Throws when the L1 entry is corrupt (misaligned offset).
    func l2TableOffset(forGuest guestOffset: UInt64) throws -> UInt64 {
        let index = Int(guestOffset / header.bytesPerL2Table)
        guard index < l1.count else { return 0 }
        let entry = QCOW2L1Entry(raw: l1[index])
        let offset = entry.l2Offset
        if offset % UInt64(clusterSize) != 0 {
            throw corruption("L2 table offset \(QCOW2BE.hex(offset)) unaligned (L1 index \(index))")
        }
        // QEMU reads a table past the end of the file as zeros (all unallocated); a table the
        // file does not contain is corruption, so simg refuses to read through it, unless the
        // command reads as QEMU does (`readPastEndAsZeros`: readOnlyFileSize is then .max).
        if offset != 0, !tableCache.contains(offset) {
            let (end, overflow) = offset.addingReportingOverflow(UInt64(clusterSize))
            if overflow || end > readOnlyFileSize {
                throw corruption("L2 table offset \(QCOW2BE.hex(offset)) is past the end of the file (L1 index \(index))")
            }
        }
        return offset
    }

    /// The L2 table at host `offset` through the cache, as decoded 64-bit words
    /// (extended L2: entry i is words 2i and 2i+1).
    func l2Table(at offset: UInt64) throws -> [UInt64] {
        try tableCache.table(at: offset)
    }

    /// The run of guest bytes starting at `guestOffset` (at most `maxLength`, never crossing
    /// an L2 table boundary) whose clusters map the same way: consecutive entries of the same
    /// kind are merged, and normal clusters only while their host offsets are contiguous.
    func lookup(at guestOffset: UInt64, maxLength: UInt64) throws -> QCOW2Run {
        let rules = QCOW2EntryRules(header)
        let tableSpan = rules.tableSpan
        let tableEnd = (guestOffset / tableSpan + 1) * tableSpan
        let limit = min(maxLength, tableEnd - guestOffset)
        let l2Offset = try l2TableOffset(forGuest: guestOffset)
        if l2Offset == 0 { return QCOW2Run(kind: .unallocated, length: limit) }
        let table = try l2Table(at: l2Offset)

        let granule = rules.granule
        let perCluster = rules.subclustersPerCluster
        var position = guestOffset
        var first: QCOW2ClusterKind?
        var length: UInt64 = 0
        while length < limit {
            let g = position / granule  // granule index in the guest
            let withinTable = Int((position % tableSpan) >> UInt64(rules.clusterBits))
            let sub = Int(g % perCluster)
            let kind: QCOW2ClusterKind
            do {
                kind = try classify(table: table, index: withinTable, subcluster: sub,
                                    l2Offset: l2Offset, guestOffset: position, rules: rules)
            } catch {
                // Return the good run before a corrupt entry; the error comes when the caller
                // asks about the corrupt entry itself.
                if first != nil { break }
                throw error
            }
            let inGranule = position % granule
            // Compressed clusters have no subclusters: a step covers the rest of the cluster.
            let step: UInt64
            if case .compressed = kind {
                step = rules.clusterSize - position % rules.clusterSize
            } else {
                step = granule - inGranule
            }
            if let first {
                guard QCOW2Image.continues(first, from: guestOffset, with: kind, at: position) else { break }
                if case .compressed = kind { break }
            } else {
                var k = kind
                if case .normal(let host) = kind { k = .normal(hostOffset: host + inGranule) }
                if case .compressed = kind {
                    return QCOW2Run(kind: k, length: min(step, limit))
                }
                first = k
            }
            length += step
            position += step
            if case .compressed = kind { continue }
            // The clusters that continue this one exactly, in one comparison each (standard
            // tables; the rest of the clusters still reaching into the range at most).
            let left = (limit - min(length, limit) + rules.clusterSize - 1) >> UInt64(rules.clusterBits)
            let more = QCOW2Image.repeats(of: withinTable, in: table, limit: Int(left), rules: rules)
            length += UInt64(more) << UInt64(rules.clusterBits)
            position += UInt64(more) << UInt64(rules.clusterBits)
        }
        return QCOW2Run(kind: first ?? .unallocated, length: min(length, limit))
    }

    /// How many of the (at most `limit`) entries after entry `index` of a standard (not
    /// extended) L2 table map exactly as it does, continued: the same flags, and a host offset
    /// one cluster further each (or, without one, the same word). Such entries classify as
    /// entry `index` does (an aligned offset plus whole clusters stays aligned), so a walk may
    /// step over them in one comparison each instead of classifying every cluster. 0 for a
    /// compressed entry or an extended table.
    static func repeats(of index: Int, in table: [UInt64], limit: Int, rules: QCOW2EntryRules) -> Int {
        guard !rules.extended, index < table.count else { return 0 }
        let first = table[index]
        let entry = QCOW2L2Entry(raw: first)
        if entry.isCompressed { return 0 }
        let hasHost = entry.hostOffset != 0 || (rules.hasDataFile && entry.isCopied)
        let step = hasHost ? rules.clusterSize : 0
        let flags = first & ~qcow2OffsetMask
        var host = first & qcow2OffsetMask
        let last = min(index + limit, table.count - 1)
        var i = index
        while i < last {
            let (next, overflow) = host.addingReportingOverflow(step)
            // Past the offset field the word would be another entry's flags, not a continuation.
            guard !overflow, next & ~qcow2OffsetMask == 0, table[i + 1] == flags | next else { break }
            host = next
            i += 1
        }
        return i - index
    }

    /// Whether `next` (at guest `position`) extends a run that started as `first` at `start`.
    private static func continues(_ first: QCOW2ClusterKind, from start: UInt64,
                                  with next: QCOW2ClusterKind, at position: UInt64) -> Bool {
        switch (first, next) {
        case (.unallocated, .unallocated), (.zero, .zero): return true
        case (.normal(let a), .normal(let b)): return b == a + (position - start)
        default: return false
        }
    }

    /// What granule `subcluster` of L2 entry `index` is.
    func classify(table: [UInt64], index: Int, subcluster: Int,
                  l2Offset: UInt64, guestOffset: UInt64) throws -> QCOW2ClusterKind {
        try classify(table: table, index: index, subcluster: subcluster, l2Offset: l2Offset,
                     guestOffset: guestOffset, rules: QCOW2EntryRules(header))
    }

    /// `classify` with the header's rules read once by the caller (table walks).
    func classify(table: [UInt64], index: Int, subcluster: Int, l2Offset: UInt64, guestOffset: UInt64,
                  rules: QCOW2EntryRules) throws -> QCOW2ClusterKind {
        let extended = rules.extended
        let entry = QCOW2L2Entry(raw: table[extended ? 2 * index : index])
        if entry.isCompressed {
            if rules.hasDataFile {
                throw corruption("compressed cluster at guest offset \(QCOW2BE.hex(guestOffset)) in an image with an external data file (L2 table \(QCOW2BE.hex(l2Offset)))")
            }
            return .compressed(entry.compressedDescriptor(clusterBits: rules.clusterBits))
        }
        let host = entry.hostOffset
        let hasHost = host != 0 || (rules.hasDataFile && entry.isCopied)
        if hasHost && host % rules.clusterSize != 0 {
            throw corruption("cluster allocation offset \(QCOW2BE.hex(host)) unaligned (L2 table \(QCOW2BE.hex(l2Offset)), guest offset \(QCOW2BE.hex(guestOffset)))")
        }
        if !extended {
            if entry.hasZeroFlag {
                if rules.version < 3 {
                    throw corruption("zero cluster entry found in a version 2 image (L2 table \(QCOW2BE.hex(l2Offset)), guest offset \(QCOW2BE.hex(guestOffset)))")
                }
                return .zero
            }
            return hasHost ? .normal(hostOffset: host) : .unallocated
        }
        let bits = QCOW2ExtendedL2Entry(entry: entry, bitmap: table[2 * index + 1])
        // As QEMU: without a host cluster any allocation bit is corrupt; with one, a subcluster
        // both allocated and zero is.
        guard hasHost else {
            if bits.allocationMask != 0 {
                throw corruption("extended L2 entry marks subclusters allocated but has no host offset (L2 table \(QCOW2BE.hex(l2Offset)), guest offset \(QCOW2BE.hex(guestOffset)))")
            }
            return bits.readsAsZero(subcluster: subcluster) ? .zero : .unallocated
        }
        if bits.allocationMask & bits.zeroMask != 0 {
            throw corruption("extended L2 entry has subclusters both allocated and zero (L2 table \(QCOW2BE.hex(l2Offset)), guest offset \(QCOW2BE.hex(guestOffset)))")
        }
        if bits.readsAsZero(subcluster: subcluster) { return .zero }
        if bits.isAllocated(subcluster: subcluster) {
            return .normal(hostOffset: host + UInt64(subcluster) * rules.granule)
        }
        return .unallocated
    }

    /// An error for inconsistent metadata, naming the image.
    func corruption(_ message: String) -> ImageError {
        ImageError(path: path, message: "Image is corrupt: " + message)
    }
}
