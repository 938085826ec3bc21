import DiskIO
import Glibc

/// qcow2 resize as QEMU 7.2's qcow2_co_truncate does it, in a crash-safe order:
/// - grow: when the L1 table does not reach the new end, a new one of exactly the entries the
///   size needs (qcow2_grow_l1_table with exact_size) is allocated (refcounts written and
///   synced), written and synced; then one 12-byte write inside the first sector switches
///   `l1_size` and `l1_table_offset`, synced; only then is the old table freed (its refcount
///   block written by the flush after the size). Then the size.
/// - shrink: the clusters past the new end are dropped from the L2 table holding the end (the
///   table written before their refcounts are lowered), the L1 entries past the new L1 size
///   are zeroed on disk and synced before their L2 tables (and the references through them
///   to the clusters they map) are freed; `l1_size` stays as QEMU leaves it; refcount blocks
///   describing only free clusters are dropped (table written first); the file is cut after
///   the last cluster in use; then the size.
/// The size field is one 8-byte write, synced: a kill at any write leaves the old size or
/// the new, and at worst leaked clusters.
extension QCOW2Image: ResizableImage {
    public func resize(to newSize: UInt64, preallocation: ResizePreallocation) throws {
        // QEMU's checks, in its order.
        guard newSize % 512 == 0 else { throw ResizeError("The new size must be a multiple of 512") }
        if header.nbSnapshots > 0 && header.version < 3 {
            throw ResizeError("Can't resize a v2 image which has snapshots")
        }
        // Persistent bitmaps follow the new size (QCOW2Image+BitmapTracking.swift).
        try checkBitmapsResizable()
        if header.hasDataFile {
            throw ResizeError("simg cannot resize a qcow2 image with an external data file yet")
        }
        // metadata only without extended L2 entries; falloc/full (QCOW2Image+ResizePrealloc)
        // not on a device (the file is grown over the new data).
        let allocates = preallocation == .falloc || preallocation == .full
        if try (preallocation == .metadata && header.hasExtendedL2) || (allocates && file.kind().isDevice) {
            throw ResizeError("simg does not support --preallocation=\(preallocation.rawValue) for this qcow2 image yet")
        }
        // QEMU's block layer asks for the new area to read as zeros when a backing file
        // would show through it (bdrv_co_truncate's BDRV_REQ_ZERO_WRITE); v2 has no zero flag
        // (falloc/full map the area to allocated clusters instead, v2 or not).
        let zeroNewArea = newSize > virtualSize && (backing?.virtualSize ?? 0) > virtualSize
        if zeroNewArea && header.version < 3 && !allocates {
            throw ResizeError("Failed to zero out new clusters: Operation not supported")
        }
        let state = try writer()
        try bitmapTracker?.loadAll()
        let bytesPerL2 = header.bytesPerL2Table
        let neededL1 = (newSize + bytesPerL2 - 1) / bytesPerL2
        do {
            if newSize < virtualSize {
                try shrinkClusters(to: newSize, l1Entries: Int(neededL1), state)
            } else {
                if neededL1 > UInt64(l1.count) { try growL1(to: neededL1, state) }
                if allocates && newSize > virtualSize {
                    try preallocateData(from: virtualSize, to: newSize, mode: preallocation,
                                        zeroNewArea: zeroNewArea, state)
                } else {
                    if preallocation == .metadata && newSize > virtualSize {
                        try preallocateMetadata(from: virtualSize, to: newSize, state)
                    }
                    if zeroNewArea { try zeroNewClusters(from: virtualSize, to: newSize) }
                }
            }
            var bytes = [UInt8](repeating: 0, count: 8)
            QCOW2BE.put64(&bytes, 0, newSize)
            try file.qcow2Write(bytes, at: 24)
            header.size = newSize
            bitmapTracker?.resizeLoaded(to: newSize)
            try syncAfterSwitch(outcome: "was resized (the new size is written but was not synced to disk)")
        } catch let error as IOError {
            throw ImageError(path: path, message: "Could not resize the image", cause: error)
        }
    }

    /// The sync after a write that switched the image to its new state: SIGINT/SIGTERM seen
    /// there (DiskFile.sync throws once one is pending) must not say the image is unchanged.
    private func syncAfterSwitch(outcome: String) throws {
        do { try file.sync() } catch let interrupted as InterruptedError {
            throw interrupted.naming(path, outcome: outcome)
        }
    }

    /// A new L1 table of `entries` entries: allocate, write, switch the header, free the old.
    private func growL1(to entries: UInt64, _ state: QCOW2WriteState) throws {
        // QEMU's limits (INT_MAX / 8 entries, then 32 MiB of table): EFBIG.
        guard entries <= UInt64(Int32.max) / 8, entries * 8 <= QCOW2Header.maxL1Bytes else {
            throw ResizeError("Failed to grow the L1 table: \(String(cString: strerror(EFBIG)))")
        }
        // Anything pending goes first (a sync less when nothing is).
        if state.l1Dirty != nil || !state.pendingFrees.isEmpty || tableCache.dirtyCount > 0
            || state.refcounts.blocks.dirtyCount > 0 { try flush() }
        let cs = UInt64(clusterSize)
        let bytes = entries * 8
        let (offset, _) = try state.refcounts.allocate(count: (bytes + cs - 1) / cs)
        // The new table's clusters are in use on disk before anything points at them.
        try state.refcounts.flush()
        try file.sync()
        var table = l1
        table.append(contentsOf: [UInt64](repeating: 0, count: Int(entries) - l1.count))
        // Exactly the table's bytes, as QEMU writes them (a table at the end of the file then
        // ends the file where QEMU's does).
        try file.qcow2Write(QCOW2BE.bytes(table), at: offset)
        try file.sync()
        var switchBytes = [UInt8](repeating: 0, count: 12)
        QCOW2BE.put32(&switchBytes, 0, UInt32(entries))
        QCOW2BE.put64(&switchBytes, 4, offset)
        try file.qcow2Write(switchBytes, at: 36)
        let oldOffset = header.l1TableOffset
        let oldBytes = UInt64(l1.count) * 8
        header.l1Size = UInt32(entries)
        header.l1TableOffset = offset
        l1 = table
        // Interrupted here, the new table is the image's (the old one stays allocated: a leak).
        try syncAfterSwitch(outcome: "was not resized (its size is unchanged; its L1 table was replaced by a larger one)")
        // Nothing points at the old table on disk any more: its refcounts are lowered in the
        // cache and written by the flush after the size (a kill before leaks it, no more).
        if oldBytes > 0 { try state.refcounts.free(offset: oldOffset, count: (oldBytes + cs - 1) / cs) }
    }

    /// Makes [oldSize, newSize) read as zeros rather than the backing file's data: zero
    /// clusters (a cluster whose old part holds data gets the rest zeroed), written and synced
    /// while the header still has the old size. The size in memory is the new one meanwhile
    /// (the zero writes are range-checked against it) and goes back on failure.
    private func zeroNewClusters(from oldSize: UInt64, to newSize: UInt64) throws {
        header.size = newSize
        do {
            try writeZeroes(at: oldSize, length: newSize - oldSize, mayUnmap: false)
            try flush()
        } catch {
            header.size = oldSize
            throw error
        }
        header.size = oldSize
    }

    /// QEMU's preallocate_co for the new range: per L2 table, the table (allocated or made
    /// writable first), then one run of host clusters for its unallocated guest clusters,
    /// mapped as data (they read as zeros: the file is extended over them, sparse). The
    /// refcounts are raised before any table maps them (the write path's order); the size
    /// changes only afterwards, so a kill leaves the old size with at worst extra mappings
    /// past it that nothing reads.
    private func preallocateMetadata(from oldSize: UInt64, to newSize: UInt64, _ state: QCOW2WriteState) throws {
        let cs = UInt64(clusterSize)
        let bytesPerL2 = header.bytesPerL2Table
        var guest = oldSize / cs * cs
        let end = (newSize + cs - 1) / cs * cs
        while guest < end {
            try Interruption.check(image: path, outcome: "was not resized (its size is unchanged)")
            let index = Int(guest / bytesPerL2)
            let tableEnd = min(end, UInt64(index + 1) * bytesPerL2)
            let table = try writableL2(l1Index: index, state)
            // The guest clusters of this table without a host cluster, in order.
            var missing: [UInt64] = []
            var g = guest
            while g < tableEnd {
                if try l2Entry(guest: g).hostOffset == 0 { missing.append(g) }
                g += cs
            }
            if !missing.isEmpty {
                let (host, _) = try state.refcounts.allocate(count: UInt64(missing.count))
                // The file covers the clusters before any table maps them: a table written
                // (by the cache, or a flush after a failure) must never point past the end of
                // the file, which qemu-img check calls corruption. Should the file not grow
                // (full disk, file size limit) the run is given back before the error.
                let runEnd = host + UInt64(missing.count) * cs
                if runEnd > (try file.size()) {
                    do { try file.truncate(to: runEnd) } catch {
                        try state.refcounts.free(offset: host, count: UInt64(missing.count))
                        throw error
                    }
                }
                for (j, g) in missing.enumerated() {
                    try setL2Entry(table: table, guest: g, .standard(hostOffset: host + UInt64(j) * cs, copied: true))
                }
            }
            guest = tableEnd
        }
        try flush()
    }

    /// Drops every cluster past `newSize` and the L2 tables past `l1Entries`, then cuts the file
    /// after the last cluster in use (QEMU's qcow2_cluster_discard with full discard,
    /// qcow2_shrink_l1_table, and the truncation to qcow2_get_last_cluster).
    private func shrinkClusters(to newSize: UInt64, l1Entries: Int, _ state: QCOW2WriteState) throws {
        let cs = UInt64(clusterSize)
        let bytesPerL2 = header.bytesPerL2Table
        let start = (newSize + cs - 1) / cs * cs
        // 1. The table holding the new end keeps its entries up to it.
        if l1Entries > 0, start < UInt64(l1Entries) * bytesPerL2 {
            let index = l1Entries - 1
            // QEMU's discard makes this table writable first whatever it holds: a missing one
            // is allocated (empty), one shared with a snapshot copied. Doing the same keeps
            // the file laid out as qemu-img leaves it.
            let table = try writableL2(l1Index: index, state)
            let stop = min(UInt64(l1Entries) * bytesPerL2, (virtualSize + cs - 1) / cs * cs)
            var guest = start
            while guest < stop {
                let (entry, bitmap) = try l2Mapping(guest: guest)
                if entry.raw != 0 || bitmap != 0 {
                    try setL2Entry(table: table, guest: guest, QCOW2L2Entry(raw: 0))
                    try release(entry, state, discard: true)
                }
                guest += cs
            }
        }
        // The table is written (and the L1 entry if it was copied) before the frees.
        try flush()
        // 2. The L1 entries past the new end: zeroed on disk first, then their tables freed.
        guard l1Entries < l1.count else { return try finishShrink(state) }
        let dropped = (l1Entries..<l1.count).filter { QCOW2L1Entry(raw: l1[$0]).l2Offset != 0 }
        if !dropped.isEmpty {
            let zeros = [UInt8](repeating: 0, count: (l1.count - l1Entries) * 8)
            try file.qcow2Write(zeros, at: header.l1TableOffset + UInt64(l1Entries) * 8)
            try file.sync()
            let bits = UInt64(header.clusterBits)
            for index in dropped {
                try Interruption.check(image: path, outcome: "was not resized (clusters past the new end may be leaked)")
                let table = QCOW2L1Entry(raw: l1[index]).l2Offset
                l1[index] = 0
                // Every cluster the table maps loses the reference that went through this L1,
                // also when the table itself is shared with a snapshot (a data cluster's
                // refcount counts each L1 that reaches it, as a copy of the table would).
                let words = try tableCache.table(at: table)
                let step = header.hasExtendedL2 ? 2 : 1
                for i in stride(from: 0, to: words.count, by: step) where words[i] != 0 {
                    try release(QCOW2L2Entry(raw: words[i]), state, discard: true)
                }
                tableCache.forget(table)
                try deferFree(cluster: table >> bits, count: 1, state, discard: true)
            }
            try flush()
        }
        try finishShrink(state)
    }

    /// 3. Refcount blocks left describing only free clusters go (QEMU does this too), then
    /// the file is cut.
    private func finishShrink(_ state: QCOW2WriteState) throws {
        try state.refcounts.dropUnusedBlocks()
        try truncateTail()
    }

    /// Cuts the file after the last cluster with a reference, as QEMU does after a shrink
    /// (a failure there is only a warning in QEMU: here it is ignored likewise).
    private func truncateTail() throws {
        guard let state = writeState as? QCOW2WriteState else { return }
        let bits = UInt64(header.clusterBits)
        let fileSize = try file.size()
        let cluster = try state.refcounts.usedClusterEnd(fileSize: fileSize)
        // DiskFile.truncate never cuts a device.
        if cluster << bits < fileSize { try? file.truncate(to: cluster << bits) }
    }
}
