import DiskIO
import Glibc

/// Internal snapshots: create, apply, delete, each as one `QCOW2MetadataSwitch` (everything
/// that changes written into free clusters, then the header switched in one write), so a kill
/// leaves either the old image or the new one, never refcounts and COPIED flags that disagree.
///
/// Refcounts follow QEMU's rule (qcow2_update_snapshot_refcount): a data cluster counts once per
/// L1 table that reaches it, an L2 table once per L1 table that points at it; an active entry
/// has COPIED exactly when its cluster's refcount is 1. Unlike QEMU, a created snapshot keeps
/// the old active L2 tables and the active layer gets copies (QEMU shares them until the next
/// write copies them); `qemu-img check` sees the same counts either way.
extension QCOW2Image: SnapshottingImage {
    public var snapshotList: [SnapshotInfo] { snapshots.map(\.info) }

    public func createSnapshot(name: String, dateSeconds: UInt32, dateNanoseconds: UInt32) throws {
        try checkSnapshotWritable(create: true)
        // QEMU_MAX_SNAPSHOTS: -EFBIG.
        guard snapshots.count < 65536 else { throw SnapshotFailure(code: EFBIG) }
        // QEMU's find_new_snapshot_id: one more than the largest numeric ID.
        let maxID = snapshots.map { Self.numericPrefix($0.id) }.max() ?? 0
        let sw = try QCOW2MetadataSwitch(image: self)
        try transact(sw, switchedOutcome: "has the new snapshot") {
            let l1Bytes = QCOW2BE.bytes(l1)
            // The snapshot's own copy of the L1 table (QEMU copies it with the flags as they are).
            let snapshotL1 = l1.isEmpty ? 0 : try sw.allocateAndWrite(l1Bytes)
            try walk(l1, by: 1, sw)
            let active = try fixCopied(l1, sw)
            let entry = QCOW2Snapshot(
                l1TableOffset: snapshotL1, l1Size: UInt32(l1.count), id: String(maxID + 1),
                name: name, dateSeconds: dateSeconds, dateNanoseconds: dateNanoseconds,
                vmClockNanoseconds: 0, vmStateSize: 0, diskSize: virtualSize, icount: 0,
                extraData: [], entrySize: 0)
            var table = snapshots
            table.append(entry)
            return (active, table, try writeSnapshotTable(table, sw))
        }
    }

    public func deleteSnapshot(named name: String) throws {
        guard let index = snapshots.firstIndex(where: { $0.name == name }) else {
            throw SnapshotFailure(code: ENOENT, message: "snapshot not found")
        }
        try checkSnapshotWritable(create: false)
        let victim = snapshots[index]
        let sw = try QCOW2MetadataSwitch(image: self)
        try transact(sw, switchedOutcome: "no longer has the snapshot") {
            let victimL1 = try readSnapshotL1(victim)
            try walk(victimL1, by: -1, sw)
            try sw.adjust(range: victim.l1TableOffset, length: UInt64(victim.l1Size) * 8, by: -1)
            let active = try fixCopied(l1, sw)
            var table = snapshots
            table.remove(at: index)
            return (active, table, try writeSnapshotTable(table, sw))
        }
    }

    public func applySnapshot(_ idOrName: String) throws {
        // QEMU's bdrv_snapshot_goto refuses any bitmap first (disabled or in use too).
        if !(try persistentBitmaps()).isEmpty { throw SnapshotFailure(code: EBUSY, message: "Device has active dirty bitmaps") }
        // QEMU refuses snapshots with an external data file (-ENOTSUP) before looking.
        if header.hasDataFile { throw SnapshotFailure(code: ENOTSUP) }
        guard let target = snapshots.first(where: { $0.id == idOrName }) ?? snapshots.first(where: { $0.name == idOrName }) else {
            throw SnapshotFailure(code: ENOENT)
        }
        try checkSnapshotWritable(create: false)
        // A snapshot of another size: qemu-img 7.2 truncates the image to the snapshot's size
        // first (qcow2_snapshot_goto's blk_truncate, a shrink dropping what lies past the end),
        // then loads the snapshot, which replaces every mapping anyway. The result is the
        // snapshot's size and content; here the size is part of the one header switch, so a
        // kill leaves the old image or the applied one, never a truncated current state.
        var newSize: UInt64?
        if let size = target.diskSize, size != virtualSize {
            // QEMU's resize checks that apply here (qcow2_co_truncate).
            guard size % 512 == 0 else { throw SnapshotFailure(code: EINVAL, message: "The new size must be a multiple of 512") }
            if header.bitmapsExtension != nil && header.autoclearFeatures & QCOW2Header.autoclearBitmaps != 0 {
                throw SnapshotFailure(code: ENOTSUP, message: "simg cannot resize a qcow2 image with persistent dirty bitmaps yet")
            }
            let entries = (size + header.bytesPerL2Table - 1) / header.bytesPerL2Table
            guard entries * 8 <= QCOW2Header.maxL1Bytes else { throw SnapshotFailure(code: EFBIG) }
            newSize = size
        }
        let sw = try QCOW2MetadataSwitch(image: self)
        try transact(sw, newSize: newSize, switchedOutcome: "was reverted to the snapshot") {
            var target = try readSnapshotL1(target)
            // The active table keeps at least its size (QEMU grows it to the snapshot's), and
            // covers the snapshot's size (QEMU's truncate grows it first when it must).
            var entries = max(target.count, l1.count)
            if let newSize { entries = max(entries, Int((newSize + header.bytesPerL2Table - 1) / header.bytesPerL2Table)) }
            if target.count < entries { target += [UInt64](repeating: 0, count: entries - target.count) }
            try walk(target, by: 1, sw)
            try walk(l1, by: -1, sw)
            let active = try fixCopied(target, sw)
            return (active, snapshots, header.snapshotsOffset)
        }
    }

    // MARK: - Steps

    /// Runs `body` (which computes the new active L1 entries, snapshot table and its offset
    /// through `sw`), writes the active L1 where it changed, and switches the header. Any
    /// error before the switch leaves the image as it was.
    ///
    /// SIGINT/SIGTERM before the switch throw an `InterruptedError` naming no image (the
    /// command words what was not done); seen by the sync after it, the image has already
    /// changed: `InterruptedError` naming the image with `switchedOutcome`.
    func transact(_ sw: QCOW2MetadataSwitch, newSize: UInt64? = nil, switchedOutcome: String,
                          _ body: () throws -> (l1: [UInt64], table: [QCOW2Snapshot], tableOffset: UInt64)) throws {
        do {
            let result = try body()
            var l1Offset = header.l1TableOffset
            if result.l1 != l1 {
                l1Offset = try sw.allocateAndWrite(QCOW2BE.bytes(result.l1))
                try sw.adjust(range: header.l1TableOffset, length: UInt64(l1.count) * 8, by: -1)
            }
            let fields = QCOW2MetadataSwitch.Fields(l1Size: UInt32(result.l1.count), l1Offset: l1Offset,
                                                    nbSnapshots: UInt32(result.table.count),
                                                    snapshotsOffset: result.tableOffset, size: newSize)
            try Interruption.check()
            try sw.commit(fields, header: &header)
            l1 = result.l1
            // As stored now (every entry with QEMU's 24 bytes of extra data).
            snapshots = try QCOW2Snapshot.readTable(file: file, header: header, fileSize: try file.size(), path: path)
            // The L2 tables read so far may be ones the image no longer uses.
            tableCache = QCOW2TableCache(file: file, tableSize: header.clusterSize)
            if let interrupted = sw.interruptedAfterSwitch {
                throw interrupted.naming(path, outcome: switchedOutcome + " (the new metadata is written but was not synced to disk)")
            }
        } catch {
            sw.abandon()
            throw error
        }
    }

    /// The checks every write action makes first: the image may be written, and every
    /// snapshot's L1 table is where a table can be (a malformed table refused before anything
    /// is written, whichever snapshot it belongs to: a rewrite would carry it on).
    private func checkSnapshotWritable(create: Bool) throws {
        guard isWritable else { throw ImageError(path: path, message: "the image is opened read-only") }
        if create && header.hasDataFile { throw SnapshotFailure(code: ENOTSUP) }
        if header.isDirty {
            throw ImageError(path: path, message: "the image is marked dirty (lazy refcounts were not written back); repair it with 'qemu-img check -r all' first")
        }
        let fileSize = try file.size()
        // Version 3 entries carry at least the VM state size and the disk size; one without is
        // what check calls incomplete (QEMU would carry it on, read with shifted names).
        if header.version >= 3, let i = snapshots.firstIndex(where: { $0.extraData.count < 16 }) {
            throw SnapshotFailure(code: EINVAL, message: "Image is corrupt: snapshot table entry \(i) is incomplete; repair it with 'qemu-img check -r all'")
        }
        for s in snapshots {
            try validateL1(offset: s.l1TableOffset, size: s.l1Size, fileSize: fileSize)
        }
    }

    /// `SnapshotViewingImage`, as qcow2_snapshot_load_tmp: the snapshot found by ID and/or
    /// name, its L1 table checked and read, then used instead of the active one (in memory
    /// only: the image is read-only, nothing is written). The L2 cache is keyed by host
    /// offset, so tables read through the active L1 stay valid.
    public func loadSnapshotTemporarily(id: String?, name: String?) throws {
        guard !isWritable else { throw SnapshotFailure(code: EINVAL, message: "Device is not readonly") }
        let found: QCOW2Snapshot?
        switch (id, name) {
        case let (id?, name?): found = snapshots.first { $0.id == id && $0.name == name }
        case let (id?, nil): found = snapshots.first { $0.id == id }
        case let (nil, name?): found = snapshots.first { $0.name == name }
        case (nil, nil): found = nil
        }
        guard let snapshot = found else { throw SnapshotFailure(code: ENOENT, message: "Can't find snapshot") }
        try validateL1(offset: snapshot.l1TableOffset, size: snapshot.l1Size, fileSize: try file.size())
        l1 = try readSnapshotL1(snapshot)
    }

    /// QEMU's qcow2_validate_table for a snapshot's L1 table, with its words.
    private func validateL1(offset: UInt64, size: UInt32, fileSize: UInt64) throws {
        guard UInt64(size) * 8 <= QCOW2Header.maxL1Bytes else {
            throw SnapshotFailure(code: EFBIG, message: "Snapshot L1 table too large")
        }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(size) * 8)
        guard offset & UInt64(clusterSize - 1) == 0, !overflow, end <= fileSize else {
            throw SnapshotFailure(code: EINVAL, message: "Snapshot L1 table offset invalid")
        }
    }

    private func readSnapshotL1(_ s: QCOW2Snapshot) throws -> [UInt64] {
        QCOW2BE.words(try file.qcow2ReadBytes(count: Int(s.l1Size) * 8, at: s.l1TableOffset))
    }

    /// An L2 table referenced by an L1 entry, checked to be a cluster inside the file.
    private func readL2(_ l1Entry: UInt64, index: Int) throws -> (offset: UInt64, words: [UInt64]) {
        let offset = l1Entry & qcow2OffsetMask
        let fileSize = try file.size()
        guard offset & UInt64(clusterSize - 1) == 0, offset < fileSize, fileSize - offset >= UInt64(clusterSize) else {
            throw ImageError(path: path, message: "Image is corrupt: L2 table offset \(QCOW2BE.hex(offset)) invalid (L1 index: \(index))")
        }
        return (offset, QCOW2BE.words(try file.qcow2ReadBytes(count: clusterSize, at: offset)))
    }

    /// Adds `delta` to the refcount of every L2 table `entries` points at and of every cluster
    /// those tables map (compressed data: every cluster its bytes touch).
    private func walk(_ entries: [UInt64], by delta: Int64, _ sw: QCOW2MetadataSwitch) throws {
        let stride = header.l2EntrySize / 8
        let bits = header.clusterBits
        // A reference past the end of the file is corruption (qemu-img check's "exceeding the
        // end of the file"): refused before its refcount is looked for (a hostile offset would
        // otherwise ask for a refcount table of exabytes).
        let cs = UInt64(clusterSize)
        let fileEnd = (try file.size() + cs - 1) / cs * cs
        func checkInFile(_ host: UInt64, _ length: UInt64, _ l2: UInt64, _ k: Int) throws {
            let (end, overflow) = host.addingReportingOverflow(length)
            guard !overflow, end <= fileEnd else {
                throw ImageError(path: path, message: "Image is corrupt: cluster offset \(QCOW2BE.hex(host)) is past the end of the file (L2 offset: \(QCOW2BE.hex(l2)), L2 index: \(k / stride))")
            }
        }
        for (i, l1Entry) in entries.enumerated() where l1Entry & qcow2OffsetMask != 0 {
            try Interruption.check()
            let (offset, words) = try readL2(l1Entry, index: i)
            // Clusters one after another on the host (preallocated images: every entry) are
            // changed as one run.
            var run: (first: UInt64, count: UInt64)?
            func flushRun() throws {
                if let r = run { try sw.adjust(cluster: r.first, count: r.count, by: delta) }
                run = nil
            }
            var k = 0
            while k < words.count {
                let entry = QCOW2L2Entry(raw: words[k])
                if entry.isCompressed {
                    try flushRun()
                    let d = entry.compressedDescriptor(clusterBits: UInt32(bits))
                    try checkInFile(d.hostOffset, UInt64(d.byteLength), offset, k)
                    try sw.adjust(range: d.hostOffset, length: UInt64(d.byteLength), by: delta)
                } else if entry.hostOffset != 0 {
                    guard entry.hostOffset & UInt64(clusterSize - 1) == 0 else {
                        throw ImageError(path: path, message: "Image is corrupt: cluster allocation offset \(QCOW2BE.hex(entry.hostOffset)) unaligned (L2 offset: \(QCOW2BE.hex(offset)), L2 index: \(k / stride))")
                    }
                    try checkInFile(entry.hostOffset, cs, offset, k)
                    let cluster = entry.hostOffset >> UInt64(bits)
                    if let r = run, r.first + r.count == cluster {
                        run = (r.first, r.count + 1)
                    } else {
                        try flushRun()
                        run = (cluster, 1)
                    }
                }
                k += stride
            }
            try flushRun()
            try sw.adjust(cluster: offset >> UInt64(bits), by: delta)
        }
    }

    /// The active L1 entries after the refcounts changed: every L2 entry with COPIED exactly
    /// when its cluster's new refcount is 1; a table whose entries change is written anew into
    /// a free cluster (the old one released), so the tables on disk stay as they were.
    private func fixCopied(_ entries: [UInt64], _ sw: QCOW2MetadataSwitch) throws -> [UInt64] {
        let stride = header.l2EntrySize / 8
        let bits = UInt64(header.clusterBits)
        var result = entries
        for (i, l1Entry) in entries.enumerated() {
            guard l1Entry & qcow2OffsetMask != 0 else {
                result[i] = 0
                continue
            }
            try Interruption.check()
            let (offset, words) = try readL2(l1Entry, index: i)
            var updated = words
            var k = 0
            while k < words.count {
                let entry = QCOW2L2Entry(raw: words[k])
                var copied = false
                if !entry.isCompressed && entry.hostOffset != 0 {
                    copied = try sw.refcount(ofCluster: entry.hostOffset >> bits) == 1
                }
                updated[k] = copied ? words[k] | qcow2CopiedFlag : words[k] & ~qcow2CopiedFlag
                k += stride
            }
            var table = offset
            if updated != words {
                table = try sw.allocateAndWrite(QCOW2BE.bytes(updated))
                try sw.adjust(cluster: offset >> bits, by: -1)
            }
            result[i] = table | (try sw.refcount(ofCluster: table >> bits) == 1 ? qcow2CopiedFlag : 0)
        }
        return result
    }

    /// Writes `table` into free clusters and releases the current one; returns the new
    /// offset (0 for an empty table, as QEMU writes it).
    func writeSnapshotTable(_ table: [QCOW2Snapshot], _ sw: QCOW2MetadataSwitch) throws -> UInt64 {
        let oldSize = snapshots.reduce(UInt64(0)) { $0 + UInt64($1.entrySize) }
        if !snapshots.isEmpty { try sw.adjust(range: header.snapshotsOffset, length: oldSize, by: -1) }
        let bytes = QCOW2Snapshot.serializedTable(table, diskSize: virtualSize)
        return bytes.isEmpty ? 0 : try sw.allocateAndWrite(bytes)
    }

    /// strtoul's value of an ID's leading digits (0 when there are none).
    static func numericPrefix(_ id: String) -> UInt64 {
        var value: UInt64 = 0
        for c in id.utf8 {
            guard c >= 48 && c <= 57 else { break }
            let (m, o1) = value.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(c - 48))
            if o1 || o2 { return .max - 1 }
            value = s
        }
        return value
    }
}

/// measure -l's view of a snapshot (`loadSnapshotTemporarily`, above).
extension QCOW2Image: SnapshotViewingImage {}
