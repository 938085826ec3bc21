import DiskIO

/// What `commit` does to qcow2 images: grow a base smaller than the top (with a larger L1
/// table when the new size needs one) and empty the top after its data is in the base.
extension QCOW2Image: GrowableImage, EmptiableImage {
    /// QEMU's limit on the L1 table (QCOW_MAX_L1_SIZE, 32 MiB).
    static let maxL1Bytes: UInt64 = 32 << 20

    /// Grows the virtual size, as qemu's qcow2_co_truncate with preallocation off.
    /// Order: a larger L1 table (when needed) is written to fresh clusters and synced, then
    /// one header write (size, l1_size and l1_table_offset share a sector) switches to it,
    /// synced, and only then are the old L1 clusters freed. A kill leaks clusters at worst.
    public func grow(to newSize: UInt64) throws {
        guard newSize > virtualSize else { return }
        let state = try writer()
        if !snapshots.isEmpty && header.version < 3 {
            throw ImageError(path: path, message: "Can't resize a v2 image which has snapshots")
        }
        guard newSize % 512 == 0 else {
            throw ImageError(path: path, message: "The new size must be a multiple of 512")
        }
        // Everything written so far is on disk first (tables, L1 entries, refcounts).
        try flush()
        let perTable = header.bytesPerL2Table
        let needed = (newSize + perTable - 1) / perTable
        let cs = UInt64(clusterSize)
        var newL1Offset = header.l1TableOffset
        var oldL1: (offset: UInt64, clusters: UInt64)?
        if needed > UInt64(l1.count) {
            guard needed * 8 <= QCOW2Image.maxL1Bytes else {
                throw ImageError(path: path, message: "File too large")
            }
            let clusters = (needed * 8 + cs - 1) / cs
            let (offset, _) = try state.refcounts.allocate(count: clusters)
            var table = l1
            table.append(contentsOf: [UInt64](repeating: 0, count: Int(needed) - l1.count))
            var bytes = QCOW2BE.bytes(table)
            bytes.append(contentsOf: [UInt8](repeating: 0, count: Int(clusters * cs) - bytes.count))
            do {
                try state.refcounts.flush()
                try file.qcow2Write(bytes, at: offset)
                try file.sync()
            } catch let error as IOError {
                throw ImageError(path: path, message: "Could not grow the L1 table", cause: error)
            }
            if header.l1Size > 0 {
                oldL1 = (header.l1TableOffset, (UInt64(header.l1Size) * 8 + cs - 1) / cs)
            }
            newL1Offset = offset
            l1 = table
        }
        // size (24), crypt_method (32), l1_size (36), l1_table_offset (40): one write.
        var fields = try file.qcow2ReadBytes(count: 24, at: 24)
        QCOW2BE.put64(&fields, 0, newSize)
        QCOW2BE.put32(&fields, 12, UInt32(l1.count))
        QCOW2BE.put64(&fields, 16, newL1Offset)
        do {
            try file.qcow2Write(fields, at: 24)
            try file.sync()
        } catch let error as IOError {
            throw ImageError(path: path, message: "Could not write the new size to the header", cause: error)
        }
        header.size = newSize
        header.l1Size = UInt32(l1.count)
        header.l1TableOffset = newL1Offset
        if let oldL1 {
            try deferFree(cluster: oldL1.offset / cs, count: oldL1.clusters, state, discard: true)
            try flush()
        }
    }

    /// Drops every L2 table of the active L1 and every cluster they map, so that the whole
    /// image reads from its backing file (qemu's full discard; QEMU rebuilds a v3 image from
    /// scratch instead, with the dirty bit set while its refcounts are wrong). Order: the L1
    /// entries are cleared on disk (after a sync), then the tables' and data clusters'
    /// refcounts are lowered and their space punched out; last the file is cut after its
    /// last used cluster. A kill leaks clusters at worst.
    /// The write state's checks (dirty, corrupt, backing file open): before commit writes
    /// anything into the base.
    public func checkEmptiable() throws {
        _ = try writer()
    }

    public func makeEmpty() throws {
        let state = try writer()
        // Nothing dirty in the cache may be written back after its table is dropped.
        try flush()
        let bits = UInt64(header.clusterBits)
        let step = header.hasExtendedL2 ? 2 : 1
        for index in l1.indices {
            try Interruption.check(image: path)
            let entry = QCOW2L1Entry(raw: l1[index])
            guard entry.l2Offset != 0 else { continue }
            let table = try tableCache.table(at: entry.l2Offset)
            l1[index] = 0
            state.markL1Dirty(index)
            // Refcounts count references from tables: each mapped cluster, and the table
            // itself (from this L1), loses one, shared with a snapshot or not.
            for i in stride(from: 0, to: table.count, by: step) where table[i] != 0 {
                try release(QCOW2L2Entry(raw: table[i]), state)
            }
            tableCache.forget(entry.l2Offset)
            try deferFree(cluster: entry.l2Offset >> bits, count: 1, state)
        }
        try flush()
        try trimFileEnd(state)
    }

    /// Cuts the file after its last cluster with a refcount (nothing references the rest),
    /// then gives the space of the free clusters before that back (QEMU's discard
    /// passthrough). One truncate frees most of it far faster than punching every range.
    private func trimFileEnd(_ state: QCOW2WriteState) throws {
        let cs = UInt64(clusterSize)
        let bits = UInt64(header.clusterBits)
        let size = try file.size()
        var end = (size + cs - 1) / cs
        while end > 1, try state.refcounts.refcount(ofCluster: end - 1) == 0 { end -= 1 }
        if end * cs < size {
            do { try file.truncate(to: end * cs) } catch let error as IOError {
                throw ImageError(path: path, message: "Could not truncate the emptied image", cause: error)
            }
        }
        var cluster: UInt64 = 0
        while cluster < end {
            guard try state.refcounts.refcount(ofCluster: cluster) == 0 else {
                cluster += 1
                continue
            }
            var stop = cluster + 1
            while stop < end, try state.refcounts.refcount(ofCluster: stop) == 0 { stop += 1 }
            // Best effort, as in QEMU.
            try? file.punchHole(at: cluster << bits, length: (stop - cluster) << bits)
            cluster = stop
        }
    }
}
