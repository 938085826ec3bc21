import DiskIO

/// Writes at subcluster granularity for images with extended L2 entries (32 subclusters per
/// cluster, each with an "allocated" and a "reads as zeros" bit).
extension QCOW2Image {
    /// Writes `data` (inside one guest cluster, starting at guest `position`) by allocating
    /// only the subclusters it touches. Returns false for clusters this cannot handle (compressed,
    /// or a host cluster shared with a snapshot): the caller then replaces the whole cluster.
    func writeSubclusters(_ data: UnsafeRawBufferPointer, at position: UInt64, l1Index: Int,
                          _ state: QCOW2WriteState) throws -> Bool {
        let cs = UInt64(clusterSize)
        let sub = UInt64(header.subclusterSize)
        let clusterStart = position / cs * cs
        let (entry, bitmap) = try l2Mapping(guest: clusterStart)
        if entry.isCompressed { return false }
        let hasHost = entry.hostOffset != 0 || (externalData && entry.isCopied)
        if hasHost && !entry.isCopied { return false }

        let table = try writableL2(l1Index: l1Index, state)
        var host: UInt64
        var fresh = false
        if externalData {
            host = clusterStart
            fresh = host >= state.dataFileEnd
        } else if hasHost {
            host = entry.hostOffset
            try checkNotMetadata(host, length: cs, guest: clusterStart)
        } else {
            (host, fresh) = try state.refcounts.allocate(count: 1)
        }
        let allocated = UInt32(truncatingIfNeeded: bitmap)
        let zero = UInt32(truncatingIfNeeded: bitmap >> 32)
        let a = position - clusterStart
        let b = a + UInt64(data.count)
        let first = Int(a / sub), last = Int((b - 1) / sub)

        // Copy-on-write only for the partly written subclusters at either end that are not
        // allocated yet (their old contents come from zero bits, the backing file or zeros).
        func readsZero(_ s: Int) -> Bool {
            zero & (1 << UInt32(s)) != 0 || !backingCovers(clusterStart + UInt64(s) * sub)
        }
        let headStart = UInt64(first) * sub
        if a > headStart && allocated & (1 << UInt32(first)) == 0 && !(fresh && readsZero(first)) {
            try copyOld(guest: clusterStart + headStart, length: a - headStart, to: host + headStart)
        }
        let tailEnd = min(UInt64(last + 1) * sub, virtualSize - clusterStart)
        if b < tailEnd && allocated & (1 << UInt32(last)) == 0 && !(fresh && readsZero(last)) {
            try copyOld(guest: clusterStart + b, length: tailEnd - b, to: host + b)
        }
        try dataFile.qcow2Write(data, at: host + a)
        if externalData { state.dataFileEnd = max(state.dataFileEnd, host + b) }

        let touched = QCOW2Image.subclusterMask(first, last)
        let newBitmap = UInt64(allocated | touched) | UInt64(zero & ~touched) << 32
        let i = l2Index(clusterStart)
        let raw = QCOW2L2Entry.standard(hostOffset: host, copied: true).raw
        try tableCache.update(at: table) { words in
            words[2 * i] = raw
            words[2 * i + 1] = newBitmap
        }
        return true
    }

    /// Zeroes [start, end) inside one guest cluster of an extended-L2 image: whole subclusters
    /// get their zero bit (and lose their allocated bit); partly covered ones that do not read
    /// as zeros already are written with zeros.
    func zeroSubclusters(_ start: UInt64, _ end: UInt64, _ state: QCOW2WriteState) throws {
        let cs = UInt64(clusterSize)
        let sub = UInt64(header.subclusterSize)
        let clusterStart = start / cs * cs
        var (entry, bitmap) = try l2Mapping(guest: clusterStart)
        if entry.isCompressed || header.isDataFileRaw {
            // No subclusters to mark (or the raw data file must hold the zeros): write them.
            if try !readsAsZero(entry, guest: clusterStart) { try writeZeroBytes(start, end) }
            return
        }
        var whole: UInt32 = 0
        var s = Int((start - clusterStart) / sub)
        while clusterStart + UInt64(s) * sub < end {
            let subStart = clusterStart + UInt64(s) * sub
            let subEnd = min(subStart + sub, virtualSize)
            let lo = max(start, subStart), hi = min(end, subEnd)
            let bit = UInt32(1) << UInt32(s)
            let isAllocated = UInt32(truncatingIfNeeded: bitmap) & bit != 0
            let isZero = UInt32(truncatingIfNeeded: bitmap >> 32) & bit != 0
            let readsZero = isZero || (!isAllocated && !backingCovers(subStart))
            if lo == subStart && hi == subEnd {
                // Allocated data, or backing data showing through: mark it zero.
                if !readsZero { whole |= bit }
            } else if !readsZero {
                try writeZeroBytes(lo, hi)
            }
            s += 1
        }
        guard whole != 0 else { return }
        let table = try writableL2(l1Index: Int(clusterStart / header.bytesPerL2Table), state)
        (entry, bitmap) = try l2Mapping(guest: clusterStart)
        let allocatedBits = UInt32(truncatingIfNeeded: bitmap) & ~whole
        let zeroBits = UInt32(truncatingIfNeeded: bitmap >> 32) | whole
        let i = l2Index(clusterStart)
        let raw = entry.raw
        try tableCache.update(at: table) { words in
            words[2 * i] = raw
            words[2 * i + 1] = UInt64(allocatedBits) | UInt64(zeroBits) << 32
        }
    }

    private func writeZeroBytes(_ start: UInt64, _ end: UInt64) throws {
        try writeZeroData(at: start, length: end - start)
    }

    /// Bits first...last set.
    static func subclusterMask(_ first: Int, _ last: Int) -> UInt32 {
        let upper: UInt32 = last >= 31 ? .max : (UInt32(1) << UInt32(last + 1)) - 1
        let lower: UInt32 = (UInt32(1) << UInt32(first)) - 1
        return upper & ~lower
    }
}
