import DiskIO

/// A run of guest bytes with one mapping, as `lookup` returns it.
struct QCOW2Run: Equatable {
    /// For `.normal`, the host offset (in the data file) of the run's first byte, which may be
    /// inside a cluster; the run is host-contiguous. For `.compressed`, the run stays inside
    /// one guest cluster.
    var kind: QCOW2ClusterKind
    var length: UInt64
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
        let tableSpan = header.bytesPerL2Table
        let tableEnd = (guestOffset / tableSpan + 1) * tableSpan
        let limit = min(maxLength, tableEnd - guestOffset)
        let l2Offset = try l2TableOffset(forGuest: guestOffset)
        if l2Offset == 0 { return QCOW2Run(kind: .unallocated, length: limit) }
        let table = try l2Table(at: l2Offset)

        let granule = granuleSize
        let perCluster = UInt64(header.subclustersPerCluster)
        var position = guestOffset
        var first: QCOW2ClusterKind?
        var length: UInt64 = 0
        while length < limit {
            let g = position / granule  // granule index in the guest
            let withinTable = Int((position % tableSpan) / UInt64(clusterSize))
            let sub = Int(g % perCluster)
            let kind: QCOW2ClusterKind
            do {
                kind = try classify(table: table, index: withinTable, subcluster: sub,
                                    l2Offset: l2Offset, guestOffset: position)
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
                step = UInt64(clusterSize) - position % UInt64(clusterSize)
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
        }
        return QCOW2Run(kind: first ?? .unallocated, length: min(length, limit))
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
        let extended = header.hasExtendedL2
        let entry = QCOW2L2Entry(raw: table[extended ? 2 * index : index])
        if entry.isCompressed {
            if header.hasDataFile {
                throw corruption("compressed cluster at guest offset \(QCOW2BE.hex(guestOffset)) in an image with an external data file (L2 table \(QCOW2BE.hex(l2Offset)))")
            }
            return .compressed(entry.compressedDescriptor(clusterBits: header.clusterBits))
        }
        let host = entry.hostOffset
        let hasHost = host != 0 || (header.hasDataFile && entry.isCopied)
        if hasHost && host % UInt64(clusterSize) != 0 {
            throw corruption("cluster allocation offset \(QCOW2BE.hex(host)) unaligned (L2 table \(QCOW2BE.hex(l2Offset)), guest offset \(QCOW2BE.hex(guestOffset)))")
        }
        if !extended {
            if entry.hasZeroFlag {
                if header.version < 3 {
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
            return .normal(hostOffset: host + UInt64(subcluster) * granuleSize)
        }
        return .unallocated
    }

    /// An error for inconsistent metadata, naming the image.
    func corruption(_ message: String) -> ImageError {
        ImageError(path: path, message: "Image is corrupt: " + message)
    }
}
