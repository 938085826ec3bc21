import DiskIO

/// Zero writes and discards on a qcow2 image (the write state and L2 helpers are in
/// QCOW2Image+Write.swift, the extended-L2 subcluster zeroing in +WriteSubclusters.swift).
///
/// Two flavours of zeroing, as QEMU's write_zeroes with and without BDRV_REQ_MAY_UNMAP:
/// - keep (`writeZeroes(at:length:)`, the `DiskImage` operation): a cluster of ours stays
///   allocated and gets the zero flag (a preallocated zero cluster), so rewriting it later
///   needs no allocation.
/// - unmap (`mayUnmap: true`, what `convert` asks for, as qemu-img convert does for the zero
///   ranges of its source): the host cluster is dropped. Version 3 entries become zero
///   clusters without a host offset (extended L2: no host offset, every subcluster zero),
///   so a backing file never shows through; version 2 entries, which have no zero flag,
///   become unallocated when no backing file lies below, else the zeros are written as data
///   (QEMU's -ENOTSUP fallback). The dropped cluster's refcount is lowered, and its space
///   punched out of the file, only in `flush`, after the tables that no longer use it are
///   written (a kill in between leaks it, never leaves a table pointing at a free cluster).
extension QCOW2Image {
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try writeZeroes(at: offset, length: length, mayUnmap: false)
    }

    /// Makes the range read as zeros. `mayUnmap`: whole clusters give their host clusters back
    /// (see above); partial clusters are zeroed as without it (QEMU does the same).
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws {
        guard length > 0 else { return }
        let state = try writer()
        try checkRange(offset, length, "write zeroes")
        markBitmapsDirty(offset, length)
        let cs = UInt64(clusterSize)
        let end = offset + length
        let alignedStart = (offset + cs - 1) / cs * cs
        // The image's last cluster counts as whole when the range reaches the end (as in
        // QEMU: nothing past the virtual size is ever read).
        let alignedEnd = end == virtualSize ? (end + cs - 1) / cs * cs : end / cs * cs
        if alignedStart >= alignedEnd {
            // Head and tail are in one cluster (or two adjacent partial ones).
            try zeroPartial(offset, end, state)
            return
        }
        if offset < alignedStart { try zeroPartial(offset, alignedStart, state) }
        if alignedEnd < end { try zeroPartial(alignedEnd, end, state) }
        try forEachCluster(from: alignedStart, to: alignedEnd) { index, guest in
            try zeroCluster(guest: guest, l1Index: index, unmap: mayUnmap, state)
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        let state = try writer()
        try checkRange(offset, length, "discard")
        markBitmapsDirty(offset, length)
        // A raw external data file must keep reading like the image: nothing to drop.
        if header.isDataFileRaw { return }
        let cs = UInt64(clusterSize)
        // Only whole clusters are dropped (as QEMU does); the tail of an image whose size is
        // not a cluster multiple counts as whole.
        let start = (offset + cs - 1) / cs * cs
        var stop = (offset + length) / cs * cs
        if offset + length == virtualSize { stop = (virtualSize + cs - 1) / cs * cs }
        guard start < stop else { return }
        try forEachCluster(from: start, to: stop) { index, guest in
            try discardCluster(guest: guest, l1Index: index, state)
        }
    }

    /// Zeroes [start, end) inside one cluster: nothing if it reads as zeros already, else a
    /// read-modify-write through `write`.
    private func zeroPartial(_ start: UInt64, _ end: UInt64, _ state: QCOW2WriteState) throws {
        guard start < end else { return }
        let cs = UInt64(clusterSize)
        var position = start
        while position < end {
            let clusterEnd = min(end, (position / cs + 1) * cs)
            if header.hasExtendedL2 {
                try zeroSubclusters(position, clusterEnd, state)
                position = clusterEnd
                continue
            }
            let entry = try l2Entry(guest: position / cs * cs)
            if try !readsAsZero(entry, guest: position / cs * cs) {
                try writeZeroData(at: position, length: clusterEnd - position)
            }
            position = clusterEnd
        }
    }

    /// Writes real zeros (as data) over the guest range, from the shared zero buffer: one
    /// write per cluster, never an allocation per call.
    func writeZeroData(at start: UInt64, length: UInt64) throws {
        let zeros = try ZeroBuffer.get()
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(ZeroBuffer.size), length - done))
            try write(UnsafeRawBufferPointer(zeros.prefix(n)), at: start + done)
            done += UInt64(n)
        }
    }

    /// Whether the entry holds a host cluster (or, with an external data file, a data range).
    private func holdsHostCluster(_ entry: QCOW2L2Entry) -> Bool {
        entry.isCompressed || entry.hostOffset != 0 || (externalData && entry.isCopied)
    }

    /// Makes one whole guest cluster read as zeros. `unmap`: drop its host cluster (also a
    /// preallocated zero cluster's); else allocate as little as possible and keep ours.
    private func zeroCluster(guest: UInt64, l1Index: Int, unmap: Bool, _ state: QCOW2WriteState) throws {
        let entry = try l2Entry(guest: guest)
        let drop = unmap && holdsHostCluster(entry)
        if try readsAsZero(entry, guest: guest) && !drop { return }
        let cs = UInt64(clusterSize)
        let length = min(cs, virtualSize - guest)
        if header.isDataFileRaw {
            // The raw data file must read as the image does: write the zeros there.
            if try !readsAsZero(entry, guest: guest) { try writeZeroData(at: guest, length: length) }
            return
        }
        if header.version >= 3 {
            let table = try writableL2(l1Index: l1Index, state)
            if try !unmap && canWriteInPlace(entry, guest: guest) {
                // Keep our cluster allocated (preallocated zero cluster), as QEMU does.
                try setL2Entry(table: table, guest: guest,
                               .standard(hostOffset: entry.hostOffset, copied: true, zero: true))
                return
            }
            try setL2Entry(table: table, guest: guest, .standard(hostOffset: 0, copied: false, zero: true))
            try dropHostCluster(entry, guest: guest, discard: unmap, state)
            return
        }
        // Version 2 has no zero flag.
        if backingCovers(guest) {
            try writeZeroData(at: guest, length: length)
            return
        }
        let table = try writableL2(l1Index: l1Index, state)
        try setL2Entry(table: table, guest: guest, QCOW2L2Entry(raw: 0))
        try dropHostCluster(entry, guest: guest, discard: unmap, state)
    }

    /// After the entry of `guest` no longer points at the host cluster of `entry`: its refcount
    /// is lowered in `flush`, and with `discard` its space goes back to the file system. An
    /// external data file's range is not refcounted: it is punched at once where the file
    /// system can (it reads as zeros then, which is what the cluster is being made to read).
    private func dropHostCluster(_ entry: QCOW2L2Entry, guest: UInt64, discard: Bool,
                                 _ state: QCOW2WriteState) throws {
        if externalData && !entry.isCompressed {
            if discard && holdsHostCluster(entry) {
                try? dataFile.punchHole(at: guest, length: min(UInt64(clusterSize), virtualSize - guest))
            }
            return
        }
        try release(entry, state, discard: discard)
    }

    /// Drops one whole guest cluster: it then reads as zeros (v3 with a backing file gets the
    /// zero flag so the backing file's data does not show through) or from the backing file (v2).
    private func discardCluster(guest: UInt64, l1Index: Int, _ state: QCOW2WriteState) throws {
        let (entry, bitmap) = try l2Mapping(guest: guest)
        let allocated = holdsHostCluster(entry)
        let wantZeroFlag = header.version >= 3 && backingCovers(guest)
        let alreadyZero = header.hasExtendedL2 ? bitmap >> 32 == 0xffff_ffff : entry.hasZeroFlag
        // Nothing allocated: only an unallocated cluster over backing data needs the zero flag.
        if !allocated && !(wantZeroFlag && !alreadyZero) { return }
        let table = try writableL2(l1Index: l1Index, state)
        try setL2Entry(table: table, guest: guest,
                       wantZeroFlag ? .standard(hostOffset: 0, copied: false, zero: true) : QCOW2L2Entry(raw: 0))
        if externalData && !entry.isCompressed && allocated {
            // Let the data file drop the range too, where the file system can.
            let cs = UInt64(clusterSize)
            try? dataFile.punchHole(at: guest, length: min(cs, virtualSize - guest))
            return
        }
        if allocated { try release(entry, state) }
    }
}
