import DiskIO
import Glibc

/// The snapshot table as QEMU's check reads and repairs it (qcow2_check_read_snapshot_table,
/// qcow2_check_fix_snapshot_table): the image is opened without the table, then the table is
/// read here; what cannot be read is a check error, what `-r all` can cut is a corruption.
extension QCOW2Checker {
    static let maxSnapshots: UInt64 = 65536

    private func snapshotTableFailure(_ code: Int32, _ message: String) -> ImageCheckFailure {
        snapshotResult.checkErrors += 1
        var combined = result
        combined.checkErrors += snapshotResult.checkErrors
        return ImageCheckFailure(errno: code, result: combined, message: message)
    }

    /// Reads the table the header points at into `snapshots`, counting into `snapshotResult`.
    func readSnapshotTable() throws {
        var count = UInt64(header.nbSnapshots)
        let start = header.snapshotsOffset
        var reduced: UInt64 = 0
        var dropped: Int64 = 0
        if count > Self.maxSnapshots && repair.fixesErrors {
            say("Discarding \(count - Self.maxSnapshots) overhanging snapshots")
            reduced += count - Self.maxSnapshots
            count = Self.maxSnapshots
        }
        if count > Self.maxSnapshots {
            throw snapshotTableFailure(EFBIG, "ERROR snapshot table too large\n"
                + "You can force-remove all \(count - Self.maxSnapshots) overhanging snapshots with qemu-img check -r all")
        }
        if start > UInt64(Int64.max) - count * 40 || intoCluster(start) != 0 {
            throw snapshotTableFailure(EINVAL, "ERROR snapshot table offset invalid")
        }

        var list: [QCOW2Snapshot] = []
        var offset = start
        var tableLength: UInt64 = 0
        var index: UInt64 = 0
        while index < count {
            defer { index += 1 }
            let entryStart = offset
            tableLength = (tableLength + 7) & ~7
            let fixed = try file.qcow2ReadBytes(count: 40, at: offset)
            let idLength = Int(QCOW2BE.u16(fixed, 12))
            let nameLength = Int(QCOW2BE.u16(fixed, 14))
            let storedExtra = UInt64(QCOW2BE.u32(fixed, 36))
            var keptExtra = Int(min(storedExtra, UInt64(QCOW2Snapshot.maxExtraData)))
            if storedExtra > UInt64(QCOW2Snapshot.maxExtraData) {
                guard repair.fixesErrors else {
                    throw snapshotTableFailure(EFBIG, "ERROR failed to read the snapshot table: "
                        + QCOW2Snapshot.extraDataMessage(index: Int(index)))
                }
                say("Discarding too much extra metadata in snapshot table entry \(index) (\(storedExtra) > \(QCOW2Snapshot.maxExtraData))")
                dropped += 1
                keptExtra = QCOW2Snapshot.maxExtraData
            }
            let extra = try file.qcow2ReadBytes(count: keptExtra, at: offset + 40)
            let namesAt = offset + 40 + storedExtra
            let names = try file.qcow2ReadBytes(count: idLength + nameLength, at: namesAt)
            offset = namesAt + UInt64(idLength + nameLength)
            tableLength += UInt64(40 + keptExtra + idLength + nameLength)
            if tableLength > QCOW2Snapshot.maxTableBytes || offset - start > UInt64(Int32.max) {
                guard repair.fixesErrors else {
                    throw snapshotTableFailure(EFBIG, "ERROR failed to read the snapshot table: "
                        + QCOW2Snapshot.tooBigMessage(overhanging: Int(count - index)))
                }
                say("Discarding \(count - index) overhanging snapshots (snapshot table is too big)")
                reduced += count - index
                count = index
                offset = entryStart
                break
            }
            var vmState = UInt64(QCOW2BE.u32(fixed, 32))
            if keptExtra >= 8 { vmState = QCOW2BE.u64(extra, 0) }
            var icount: UInt64?
            if keptExtra >= 24 {
                let value = QCOW2BE.u64(extra, 16)
                icount = value == .max ? nil : value
            }
            list.append(QCOW2Snapshot(
                l1TableOffset: QCOW2BE.u64(fixed, 0), l1Size: QCOW2BE.u32(fixed, 8),
                id: QCOW2Snapshot.cString(names[0..<idLength]),
                name: QCOW2Snapshot.cString(names[idLength...]),
                dateSeconds: QCOW2BE.u32(fixed, 16), dateNanoseconds: QCOW2BE.u32(fixed, 20),
                vmClockNanoseconds: QCOW2BE.u64(fixed, 24), vmStateSize: vmState,
                diskSize: keptExtra >= 16 ? QCOW2BE.u64(extra, 8) : nil, icount: icount,
                extraData: extra, entrySize: Int((offset - entryStart + 7) & ~7)))
            // The next entry starts 8-aligned.
            offset = (offset + 7) & ~7
        }
        snapshots = list
        snapshotResult.corruptions += Int64(reduced) + dropped

        if reduced > 0 {
            // The header must say how many entries remain before the refcount pass counts
            // the table (the dropped entries' clusters become leaks it frees).
            var field: [UInt8] = []
            QCOW2BE.append32(&field, UInt32(count))
            try file.qcow2Write(field, at: 60)
            try file.sync()
            header.nbSnapshots = UInt32(count)
            snapshotResult.corruptionsFixed += Int64(reduced)
            snapshotResult.corruptions -= Int64(reduced)
        }
        // Version 3 entries carry at least the large VM state size and the disk size.
        if header.version >= 3 {
            for (i, s) in snapshots.enumerated() where s.extraData.count < 16 {
                snapshotResult.corruptions += 1
                say("\(repair.fixesErrors ? "Repairing" : "ERROR") snapshot table entry \(i) is incomplete")
            }
        }
    }

    /// After the refcount pass: with `-r all`, writes the table anew if reading it found
    /// corruptions, then adds the table's counts into `result`.
    func fixSnapshotTable() throws {
        if snapshotResult.corruptions != 0 && repair.fixesErrors {
            do {
                try writeSnapshotTable()
            } catch let error as SnapshotTableWriteFailure {
                snapshotResult.checkErrors += 1
                addSnapshotResult()
                say("ERROR failed to update snapshot table: \(String(cString: strerror(error.code)))")
                throw ImageCheckFailure(errno: error.code, result: result)
            }
            snapshotResult.corruptionsFixed += snapshotResult.corruptions
            snapshotResult.corruptions = 0
        }
        addSnapshotResult()
    }

    func addSnapshotResult() {
        result.checkErrors += snapshotResult.checkErrors
        result.corruptions += snapshotResult.corruptions
        result.leaks += snapshotResult.leaks
        result.corruptionsFixed += snapshotResult.corruptionsFixed
        result.leaksFixed += snapshotResult.leaksFixed
        snapshotResult = ImageCheckResult()
    }

    private struct SnapshotTableWriteFailure: Error { var code: Int32 }

    /// The table as QEMU writes it (QCOW2Snapshot.serializedTable).
    func serializedSnapshotTable() -> [UInt8] {
        QCOW2Snapshot.serializedTable(snapshots, diskSize: header.size & ~511)
    }

    /// QEMU's qcow2_write_snapshots: the new table goes into free clusters (first fit of
    /// the stored refcounts), is synced, then the header is switched to it, then the old
    /// table's clusters are freed; an interruption leaves at worst a leak.
    private func writeSnapshotTable() throws {
        let table = serializedSnapshotTable()
        let oldOffset = header.snapshotsOffset
        let oldSize = snapshotsOnDiskSize()
        var newOffset: UInt64 = 0
        if !table.isEmpty {
            let need = clusters(UInt64(table.count))
            var cluster: UInt64 = 0, run: UInt64 = 0
            while run < need {
                guard cluster < UInt64(Int32.max) else { throw SnapshotTableWriteFailure(code: ENOSPC) }
                // An unreadable refcount counts as in use.
                if try stored.refcount(of: cluster) == 0 { run += 1 } else { run = 0 }
                cluster += 1
            }
            let first = cluster - need
            // QEMU's pre-write overlap check: the old table may claim clusters its refcounts
            // never counted (a table reaching past the end of the file).
            let oldEnd = oldOffset &+ oldSize
            if oldSize > 0 && oldOffset < cluster << clusterBits && first << clusterBits < oldEnd {
                try signalCorruption("Preventing invalid write on metadata (overlaps with snapshot table)")
                throw SnapshotTableWriteFailure(code: EIO)
            }
            for c in first..<cluster {
                // A new refcount block would be needed here; simg does not grow the structure in check.
                guard try stored.setRefcount(of: c, to: 1) else { throw SnapshotTableWriteFailure(code: ENOSPC) }
            }
            try stored.flush()
            try file.sync()
            newOffset = first << clusterBits
            try file.qcow2Write(table, at: newOffset)
            try file.sync()
        }
        var field: [UInt8] = []
        QCOW2BE.append32(&field, UInt32(snapshots.count))
        QCOW2BE.append64(&field, newOffset)
        try file.qcow2Write(field, at: 60)
        try file.sync()
        header.nbSnapshots = UInt32(snapshots.count)
        header.snapshotsOffset = newOffset

        // Freeing is all or nothing, as QEMU undoes a partial decrement.
        guard oldSize > 0 else { return }
        let firstOld = oldOffset >> clusterBits
        let (oldEnd, overflow) = oldOffset.addingReportingOverflow(oldSize - 1)
        guard !overflow else { say("qcow2_free_clusters failed: Invalid argument"); return }
        let lastOld = oldEnd >> clusterBits
        var values: [UInt64] = []
        for c in firstOld...lastOld {
            guard let value = try stored.refcount(of: c), value > 0, values.count < 1 << 20 else {
                say("qcow2_free_clusters failed: Invalid argument")
                return
            }
            values.append(value)
        }
        for (k, c) in (firstOld...lastOld).enumerated() {
            _ = try stored.setRefcount(of: c, to: values[k] - 1)
        }
        try stored.flush()
        try file.sync()
    }

    /// Bytes the table read occupies (QEMU's snapshots_size, which stops at the end of the
    /// last entry's name; here with its padding, which covers the same clusters).
    func snapshotsOnDiskSize() -> UInt64 {
        guard let last = snapshots.last else { return 0 }
        // The padding after the last entry never reaches into another cluster.
        return snapshots.dropLast().reduce(0) { $0 + UInt64($1.entrySize) } + UInt64(last.entrySize)
    }
}
