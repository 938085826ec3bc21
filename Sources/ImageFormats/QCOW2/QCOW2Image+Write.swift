import DiskIO

/// What the write path keeps per image (stored in `QCOW2Image.writeState`).
final class QCOW2WriteState {
    let refcounts: QCOW2Refcounts
    /// L1 entries changed in memory and not yet written: [lower, upper).
    var l1Dirty: Range<Int>?
    /// Bytes of the data file known to exist; clusters at or past it read as zeros (only
    /// used with an external data file, where host offset == guest offset).
    var dataFileEnd: UInt64
    /// Clusters whose reference was dropped from an L2 (or L1) entry in memory: their
    /// refcounts are lowered only after the tables that no longer use them are on disk, so a
    /// crash can leak them but never leave a table pointing at a free cluster. `discard`: a
    /// cluster whose refcount then drops to 0 has its space given back to the file system
    /// (QEMU's discard passthrough for zero writes that may unmap: `writeZeroes(mayUnmap:)`).
    var pendingFrees: [(cluster: UInt64, count: UInt64, discard: Bool)] = []
    /// More pending frees than this trigger a flush (bounds memory on huge discards).
    static let pendingFreeLimit = 1 << 16
    /// Where compressed clusters are packed (QCOW2Image+WriteCompressed.swift).
    let compressedArea = QCOW2CompressedArea()

    init(refcounts: QCOW2Refcounts, dataFileEnd: UInt64) {
        self.refcounts = refcounts
        self.dataFileEnd = dataFileEnd
    }

    func markL1Dirty(_ index: Int) {
        if let range = l1Dirty {
            l1Dirty = min(range.lowerBound, index)..<max(range.upperBound, index + 1)
        } else {
            l1Dirty = index..<(index + 1)
        }
    }
}

/// The qcow2 write path.
///
/// - Writes to clusters that are allocated with refcount 1 (COPIED) go in place. Other
///   clusters get new host clusters (consecutive guest clusters of one request get one
///   contiguous run), filled with the request's data and, where the request covers a cluster
///   only partly, the cluster's old contents (backing file, compressed data, shared cluster):
///   copy-on-write. When the old contents read as zeros and the new cluster lies past the old
///   end of the file (so it reads as zeros already), nothing is filled: a sequential writer
///   that ends mid-cluster and continues in the next request writes each byte once, because
///   its next request finds the cluster allocated with COPIED and writes in place.
/// - Refcounts are exact at all times; the lazy-refcounts dirty bit is never set.
/// - Write-back order (crash consistency, docs/ARCHITECTURE.md): data before the L2 entry that
///   maps it (the data write completes before the entry changes in memory); refcount blocks,
///   sync, L2 tables (the L2 cache's `beforeWriteback` flushes and syncs refcount blocks first,
///   also on eviction), sync, the L1 table, sync; only then are the refcounts of replaced
///   clusters lowered (`pendingFrees`), and then the space of those a zero write that may
///   unmap dropped is punched out of the file. A kill at any point leaks clusters at worst.
///   (Zero writes and discard: QCOW2Image+Zero.swift. Under cache mode unsafe every sync is
///   skipped, `DiskFile.ignoresFlushes`; the order stays.)
///   The header only changes when the refcount table moves, and before the first write when
///   autoclear bits simg does not maintain are cleared (each written and synced at once) and
///   the persistent bitmaps are marked in use (a metadata switch; stored again at close).
/// - Extended L2 entries: writes allocate subclusters (copy-on-write only for partly written
///   subclusters; QCOW2Image+WriteSubclusters.swift); compressed and shared clusters are
///   replaced as whole clusters. Zeroing sets zero bits per whole subcluster.
/// - Not supported (refused with an error naming the image): images with the dirty or
///   corrupt bit, and images whose named backing file was not opened.
extension QCOW2Image {
    // MARK: - Public operations

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard data.count > 0 else { return }
        let state = try writer()
        try checkRange(offset, UInt64(data.count), "write")
        markBitmapsDirty(offset, UInt64(data.count))
        var done = 0
        while done < data.count {
            let position = offset + UInt64(done)
            let tableEnd = (position / header.bytesPerL2Table + 1) * header.bytesPerL2Table
            let n = Int(min(UInt64(data.count - done), tableEnd - position))
            // Sound: done + n <= data.count.
            try writeWithinTable(UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]), at: position, state)
            done += n
        }
    }

    public func flush() throws {
        guard let state = writeState as? QCOW2WriteState else { return }
        do {
            // Refcount blocks, then (after a sync, for power loss; a killed process keeps the
            // order of completed writes anyway) the L2 tables that use their clusters.
            let refcountsDirty = state.refcounts.blocks.dirtyCount > 0
            try state.refcounts.flush()
            if refcountsDirty && tableCache.dirtyCount > 0 { try file.sync() }
            try tableCache.flush()
            if let range = state.l1Dirty {
                // The L2 tables the new L1 entries point at must be on disk first.
                try file.sync()
                let bytes = QCOW2BE.bytes(Array(l1[range]))
                try file.qcow2Write(bytes, at: header.l1TableOffset + UInt64(range.lowerBound) * 8)
                state.l1Dirty = nil
            }
            try file.sync()
            if !state.pendingFrees.isEmpty {
                // The tables no longer reference these clusters on disk: now they may be freed.
                let frees = state.pendingFrees
                state.pendingFrees = []
                var unused: [(cluster: UInt64, count: UInt64)] = []
                for free in frees {
                    try state.refcounts.adjust(cluster: free.cluster, count: free.count, by: -1)
                    guard free.discard else { continue }
                    for cluster in free.cluster..<(free.cluster + free.count)
                    where try state.refcounts.refcount(ofCluster: cluster) == 0 {
                        if let last = unused.last, last.cluster + last.count == cluster {
                            unused[unused.count - 1].count += 1
                        } else {
                            unused.append((cluster, 1))
                        }
                    }
                }
                // A freed cluster may be the partly filled compressed one: start a new one.
                state.compressedArea.forgetPartialCluster()
                try state.refcounts.flush()
                try file.sync()
                // Nothing references these clusters any more, on disk either, and nothing can
                // have reused them yet (allocation only happens in later calls): give their
                // space back, as QEMU's discard passthrough does. Best effort, as in QEMU.
                let bits = UInt64(header.clusterBits)
                for range in unused { try? file.punchHole(at: range.cluster << bits, length: range.count << bits) }
            }
            if dataFile !== file { try dataFile.sync() }
        } catch let error as IOError {
            throw ImageError(path: path, message: "Could not write back metadata", cause: error)
        }
    }

    // MARK: - Setup

    /// The write state, created on first use after checking the image can be written.
    func writer() throws -> QCOW2WriteState {
        if let state = writeState as? QCOW2WriteState { return state }
        guard isWritable else { throw ImageError(path: path, message: "the image is opened read-only") }
        if header.isCorrupt {
            throw ImageError(path: path, message: "the image is marked corrupt; it must not be written")
        }
        if header.isDirty {
            throw ImageError(path: path, message: "the image is marked dirty (lazy refcounts were not written back); repair it with 'qemu-img check -r all' before writing")
        }
        if header.backingFileName != nil && backing == nil {
            throw ImageError(path: path, message: "cannot write: the backing file '\(header.backingFileName ?? "")' is not open, so copy-on-write would lose its data")
        }
        // Persistent bitmaps are kept: marked in use now (a metadata switch, which moves the
        // refcount table: before the write state reads it), dirtied by each write, stored at
        // close (QCOW2Image+BitmapTracking.swift).
        try startBitmapTracking()
        let refcounts = try QCOW2Refcounts(file: file, path: path, header: header)
        let dataEnd = dataFile === file ? 0 : try dataFile.size()
        let state = QCOW2WriteState(refcounts: refcounts, dataFileEnd: dataEnd)
        refcounts.tableMoved = { [unowned self] offset, clusters in
            self.header.refcountTableOffset = offset
            self.header.refcountTableClusters = UInt32(clusters)
            var bytes = [UInt8](repeating: 0, count: 12)
            QCOW2BE.put64(&bytes, 0, offset)
            QCOW2BE.put32(&bytes, 8, UInt32(clusters))
            try self.file.qcow2Write(bytes, at: 48)
            try self.file.sync()
        }
        // Refcount blocks reach stable storage before any L2 table that uses their clusters
        // (QEMU's cache dependency does the same: flush the blocks, then sync).
        tableCache.beforeWriteback = { [unowned refcounts, unowned file] in
            if refcounts.blocks.dirtyCount > 0 {
                try refcounts.flush()
                try file.sync()
            }
        }
        // Other autoclear bits simg does not maintain must be cleared before writing.
        let keep = header.autoclearFeatures & (QCOW2Header.autoclearDataFileRaw | QCOW2Header.autoclearBitmaps)
        if header.version >= 3 && header.autoclearFeatures != keep {
            header.autoclearFeatures = keep
            var bytes = [UInt8](repeating: 0, count: 8)
            QCOW2BE.put64(&bytes, 0, keep)
            try file.qcow2Write(bytes, at: 88)
            try file.sync()
        }
        writeState = state
        return state
    }

    func checkRange(_ offset: UInt64, _ length: UInt64, _ what: String) throws {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= virtualSize else {
            throw ImageError(path: path, message: "\(what) of \(length) bytes at offset \(offset) is past the end of the image (virtual size \(virtualSize))")
        }
    }

    // MARK: - L2 entries

    var externalData: Bool { header.hasDataFile }

    /// The L2 entry of guest cluster `guest` (0 when no table), with its subcluster bitmap
    /// for extended L2 entries (0 otherwise).
    func l2Entry(guest: UInt64) throws -> QCOW2L2Entry {
        try l2Mapping(guest: guest).entry
    }

    func l2Mapping(guest: UInt64) throws -> (entry: QCOW2L2Entry, bitmap: UInt64) {
        let table = try l2TableOffset(forGuest: guest)
        if table == 0 { return (QCOW2L2Entry(raw: 0), 0) }
        let i = l2Index(guest)
        if !header.hasExtendedL2 {
            return (QCOW2L2Entry(raw: try tableCache.word(at: table, index: i)), 0)
        }
        let words = try tableCache.table(at: table)
        return (QCOW2L2Entry(raw: words[2 * i]), words[2 * i + 1])
    }

    /// Extended L2 bitmaps: every subcluster allocated, or every subcluster reading as zeros.
    static let allAllocated: UInt64 = 0xffff_ffff
    static let allZero: UInt64 = 0xffff_ffff << 32

    func l2Index(_ guest: UInt64) -> Int {
        Int((guest % header.bytesPerL2Table) / UInt64(clusterSize))
    }

    /// The L2 table for L1 entry `index`, allocated (or copied, when shared with a snapshot)
    /// so that it can be changed.
    func writableL2(l1Index index: Int, _ state: QCOW2WriteState) throws -> UInt64 {
        let entry = QCOW2L1Entry(raw: l1[index])
        if entry.l2Offset != 0 && entry.isCopied { return entry.l2Offset }
        if entry.l2Offset % UInt64(clusterSize) != 0 {
            throw corruption("L2 table offset \(QCOW2BE.hex(entry.l2Offset)) unaligned (L1 index \(index))")
        }
        let (offset, _) = try state.refcounts.allocate(count: 1)
        var words = [UInt64](repeating: 0, count: clusterSize / 8)
        if entry.l2Offset != 0 {
            // Shared with a snapshot: the copy references the same clusters, whose refcounts
            // already count the snapshot's table and ours.
            words = try tableCache.table(at: entry.l2Offset)
        }
        try tableCache.install(at: offset, words: words)
        l1[index] = QCOW2L1Entry(l2Offset: offset, copied: true).raw
        state.markL1Dirty(index)
        if entry.l2Offset != 0 { try deferFree(cluster: entry.l2Offset >> UInt64(header.clusterBits), count: 1, state) }
        return offset
    }

    /// Sets an L2 entry. With extended L2 entries, `bitmap` is stored too; a zero flag in
    /// `entry` (which extended entries do not have) becomes "all subclusters read as zeros",
    /// and any other entry with a host offset becomes "all subclusters allocated".
    func setL2Entry(table: UInt64, guest: UInt64, _ entry: QCOW2L2Entry) throws {
        let i = l2Index(guest)
        if !header.hasExtendedL2 {
            try tableCache.update(at: table) { $0[i] = entry.raw }
            return
        }
        var raw = entry.raw
        var bitmap: UInt64 = 0
        if entry.hasZeroFlag {
            raw &= ~qcow2ZeroFlag
            bitmap = QCOW2Image.allZero
        } else if entry.hostOffset != 0 || (externalData && entry.isCopied) {
            bitmap = QCOW2Image.allAllocated
        }
        try tableCache.update(at: table) { words in
            words[2 * i] = raw
            words[2 * i + 1] = bitmap
        }
    }

    /// Drops this image's reference to the host cluster(s) behind an L2 entry that is being
    /// replaced. Data clusters of an external data file are not refcounted.
    /// `discard`: once free, the host clusters' space goes back to the file system.
    func release(_ entry: QCOW2L2Entry, _ state: QCOW2WriteState, discard: Bool = false) throws {
        if entry.isCompressed {
            let d = entry.compressedDescriptor(clusterBits: header.clusterBits)
            let first = d.hostOffset >> UInt64(header.clusterBits)
            let last = (d.hostOffset + d.byteLength - 1) >> UInt64(header.clusterBits)
            try deferFree(cluster: first, count: last - first + 1, state, discard: discard)
            invalidateDecompressedCache()
            return
        }
        if externalData { return }
        let host = entry.hostOffset
        if host != 0 { try deferFree(cluster: host >> UInt64(header.clusterBits), count: 1, state, discard: discard) }
    }

    func deferFree(cluster: UInt64, count: UInt64, _ state: QCOW2WriteState, discard: Bool = false) throws {
        state.pendingFrees.append((cluster, count, discard))
        if state.pendingFrees.count > QCOW2WriteState.pendingFreeLimit { try flush() }
    }

    /// Whether guest cluster `guest` (with L2 entry `entry`) reads as zeros without looking
    /// at data: zero flag, or unallocated where no backing file data lies.
    func readsAsZero(_ entry: QCOW2L2Entry, guest: UInt64) throws -> Bool {
        if entry.isCompressed { return false }
        if header.hasExtendedL2 {
            let bitmap = try l2Mapping(guest: guest).bitmap
            if bitmap & QCOW2Image.allAllocated != 0 { return false }
            if bitmap >> 32 == 0xffff_ffff { return true }
            return !backingCovers(guest)
        }
        if entry.hasZeroFlag && header.version >= 3 { return true }
        let allocated = entry.hostOffset != 0 || (externalData && entry.isCopied)
        if allocated { return false }
        return !backingCovers(guest)
    }

    /// For extended L2 entries: whether every subcluster of the cluster is allocated.
    private func fullyAllocated(guest: UInt64) throws -> Bool {
        guard header.hasExtendedL2 else { return true }
        return try l2Mapping(guest: guest).bitmap & QCOW2Image.allAllocated == QCOW2Image.allAllocated
    }

    func backingCovers(_ guest: UInt64) -> Bool {
        guard let backing else { return false }
        return guest < backing.virtualSize
    }

    /// Calls `body` for each guest cluster in [start, stop) (cluster-aligned), skipping L2
    /// tables that are not allocated when nothing there could need a change.
    func forEachCluster(from start: UInt64, to stop: UInt64,
                                _ body: (_ l1Index: Int, _ guest: UInt64) throws -> Void) throws {
        let cs = UInt64(clusterSize)
        var guest = start
        while guest < stop {
            // Zeroing or discarding terabytes takes a while: SIGINT/SIGTERM stop it between L2
            // tables, where memory and disk agree (what was done is flushed on close).
            try Interruption.check(image: path)
            let index = Int(guest / header.bytesPerL2Table)
            let tableEnd = min(stop, UInt64(index + 1) * header.bytesPerL2Table)
            if QCOW2L1Entry(raw: l1[index]).l2Offset == 0 && !backingCovers(guest) {
                guest = tableEnd
                continue
            }
            while guest < tableEnd {
                try body(index, guest)
                guest += cs
            }
        }
    }

    // MARK: - Writing data

    /// Writes `data` at guest `position`; the range stays inside one L2 table.
    private func writeWithinTable(_ data: UnsafeRawBufferPointer, at position: UInt64,
                                  _ state: QCOW2WriteState) throws {
        let cs = UInt64(clusterSize)
        let end = position + UInt64(data.count)
        let l1Index = Int(position / header.bytesPerL2Table)
        var guest = position / cs * cs
        while guest < end {
            if header.hasExtendedL2 {
                // Subcluster granularity, one cluster at a time; whole clusters otherwise.
                let from = max(guest, position), to = min(guest + cs, end)
                let slice = UnsafeRawBufferPointer(rebasing: data[Int(from - position)..<Int(to - position)])
                if try !writeSubclusters(slice, at: from, l1Index: l1Index, state) {
                    try allocateAndWrite(data, position: position, from: guest, to: guest + cs, l1Index: l1Index, state)
                }
                guest += cs
                continue
            }
            let entry = try l2Entry(guest: guest)
            if try canWriteInPlace(entry, guest: guest) {
                // A run of in-place clusters with contiguous host offsets: one write.
                var runEnd = guest + cs
                var expected = entry.hostOffset + cs
                while runEnd < end {
                    let next = try l2Entry(guest: runEnd)
                    guard try canWriteInPlace(next, guest: runEnd), next.hostOffset == expected else { break }
                    runEnd += cs
                    expected += cs
                }
                let from = max(guest, position), to = min(runEnd, end)
                try checkNotMetadata(entry.hostOffset, length: runEnd - guest, guest: guest)
                let slice = UnsafeRawBufferPointer(rebasing: data[Int(from - position)..<Int(to - position)])
                try dataFile.qcow2Write(slice, at: entry.hostOffset + (from - guest))
                guest = runEnd
                continue
            }
            // A run of clusters that need new host clusters.
            var runEnd = guest + cs
            // A host cluster of ours that can be reused (preallocated zero cluster, or partly
            // allocated subclusters) is handled on its own; others are allocated together.
            if !reusable(entry) {
                while runEnd < end {
                    let next = try l2Entry(guest: runEnd)
                    if try canWriteInPlace(next, guest: runEnd) || reusable(next) { break }
                    runEnd += cs
                }
            }
            try allocateAndWrite(data, position: position, from: guest, to: runEnd, l1Index: l1Index, state)
            guest = runEnd
        }
    }

    /// Refuses to write guest data over the header, the refcount table or the L1 table (an L2
    /// entry pointing there is corrupt; QEMU refuses such writes too).
    func checkNotMetadata(_ host: UInt64, length: UInt64, guest: UInt64) throws {
        guard !externalData else { return }
        let cs = UInt64(clusterSize)
        let rtEnd = header.refcountTableOffset + UInt64(header.refcountTableClusters) * cs
        let l1End = header.l1TableOffset + UInt64(l1.count) * 8
        let end = host + length
        if host < cs || (host < rtEnd && end > header.refcountTableOffset)
            || (l1End > header.l1TableOffset && host < l1End && end > header.l1TableOffset) {
            throw corruption("data cluster for guest offset \(QCOW2BE.hex(guest)) is at host offset \(QCOW2BE.hex(host)), which holds metadata; refusing to write there")
        }
    }

    /// A cluster of ours whose host cluster a write can take over: preallocated with the zero
    /// flag, or (extended L2) with subclusters not all allocated.
    private func reusable(_ entry: QCOW2L2Entry) -> Bool {
        guard !externalData, !entry.isCompressed, entry.isCopied, entry.hostOffset != 0 else { return false }
        return entry.hasZeroFlag || header.hasExtendedL2
    }

    func canWriteInPlace(_ entry: QCOW2L2Entry, guest: UInt64) throws -> Bool {
        guard !entry.isCompressed, entry.isCopied, !entry.hasZeroFlag else { return false }
        guard entry.hostOffset != 0 || externalData else { return false }
        // Extended L2: only clusters with every subcluster allocated are written in place;
        // others are completed to whole clusters (simg allocates at cluster granularity).
        return try fullyAllocated(guest: guest)
    }

    /// Gives guest clusters [first, stop) new host clusters and writes the part of `data` (which
    /// starts at guest `position`) that falls into them, with copy-on-write for partial clusters.
    func allocateAndWrite(_ data: UnsafeRawBufferPointer, position: UInt64, from first: UInt64,
                                  to stop: UInt64, l1Index: Int, _ state: QCOW2WriteState) throws {
        let cs = UInt64(clusterSize)
        let count = (stop - first) / cs
        let dataEnd = position + UInt64(data.count)
        let table = try writableL2(l1Index: l1Index, state)
        let firstEntry = try l2Entry(guest: first)
        let lastEntry = try l2Entry(guest: stop - cs)

        // Where the data goes, and whether that place reads as zeros already.
        var host: UInt64
        var fresh: Bool
        if externalData {
            host = first
            fresh = first >= state.dataFileEnd
        } else if count == 1 && reusable(firstEntry) {
            // A preallocated zero cluster of ours (or, with extended L2 entries, our host
            // cluster with some subclusters not allocated): reuse it.
            host = firstEntry.hostOffset
            fresh = false
            try checkNotMetadata(host, length: cs, guest: first)
        } else {
            (host, fresh) = try state.refcounts.allocate(count: count)
        }

        // Copy-on-write for the uncovered head and tail (clipped at the virtual size).
        let from = max(first, position), to = min(stop, dataEnd)
        if from > first, try !(fresh && readsAsZero(firstEntry, guest: first)) {
            try copyOld(guest: first, length: from - first, to: host)
        }
        let tailEnd = min(stop, virtualSize)
        if to < tailEnd, try !(fresh && readsAsZero(lastEntry, guest: stop - cs)) {
            try copyOld(guest: to, length: tailEnd - to, to: host + (to - first))
        }
        let slice = UnsafeRawBufferPointer(rebasing: data[Int(from - position)..<Int(to - position)])
        try dataFile.qcow2Write(slice, at: host + (from - first))
        if externalData { state.dataFileEnd = max(state.dataFileEnd, host + (to - first)) }

        // Now the metadata: new entries, then drop the old clusters.
        var guest = first
        var target = host
        while guest < stop {
            let old = try l2Entry(guest: guest)
            try setL2Entry(table: table, guest: guest, .standard(hostOffset: target, copied: true))
            let reused = !externalData && !old.isCompressed && old.hostOffset == target
            if !reused && !(externalData && !old.isCompressed) { try release(old, state) }
            guest += cs
            target += cs
        }
    }

    /// Copies the current guest contents of [guest, guest + length) to host offset `host` in
    /// the data file (reads go through the old mapping, which is still in place).
    func copyOld(guest: UInt64, length: UInt64, to host: UInt64) throws {
        var buffer = [UInt8](repeating: 0, count: Int(length))
        try buffer.withUnsafeMutableBytes { try read(into: $0, at: guest) }
        try dataFile.qcow2Write(buffer, at: host)
    }
}
