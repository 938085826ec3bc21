import DiskIO

/// What `commit` does to a qcow2 top: empty it after its data is in the base (a base smaller
/// than the top grows through `resize`, QCOW2Image+Resize.swift).
extension QCOW2Image: EmptiableImage {
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
            try Interruption.check()  // the command words what was left
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
        let end = try state.refcounts.usedClusterEnd(fileSize: size)
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
