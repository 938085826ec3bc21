import DiskIO
import Glibc

/// One internal snapshot table entry (docs/interop/qcow2.txt, "Snapshots").
public struct QCOW2Snapshot: Equatable, Sendable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    /// The VM state size: the 64-bit extra-data field when present, else the 32-bit one.
    public var vmStateSize: UInt64
    /// Virtual disk size at snapshot time (extra data), nil when not stored.
    public var diskSize: UInt64?
    /// Instruction count (extra data), nil when not stored or -1 (not available).
    public var icount: UInt64?
    /// The whole extra data as stored (kept so a rewrite of the table can preserve it).
    public var extraData: [UInt8]
    /// Bytes this entry occupies in the table, padding included.
    public var entrySize: Int

    /// QEMU's limits on a snapshot entry's extra data and on the whole table.
    public static let maxExtraData = 1024
    public static let maxTableBytes: UInt64 = 64 << 20
}

extension QCOW2Snapshot {
    /// Reads the snapshot table the header points at, with the rules QEMU applies when it
    /// opens an image (qcow2_read_snapshots): an entry's extra data of more than 1 KiB and a
    /// table of more than 64 MiB are refused.
    /// A snapshot's L1 table is not validated here: only code that uses the snapshot's
    /// contents needs it to be sound (QEMU opens such images, and `check` reports them).
    static func readTable(file: DiskFile, header h: QCOW2Header, fileSize: UInt64, path: String) throws -> [QCOW2Snapshot] {
        func fail(_ message: String) -> ImageError { ImageError(.snapshotTable, path: path, message: message) }
        var result: [QCOW2Snapshot] = []
        var offset = h.snapshotsOffset
        let count = Int(h.nbSnapshots)
        for index in 0..<count {
            // QEMU reads past the end of the file as zeros; simg refuses an entry there (a
            // table the header places past the end is refused by the header's own checks).
            guard offset + 40 <= fileSize else {
                throw fail("snapshot table entry \(index) at offset \(offset) is outside the file")
            }
            let fixed = try file.qcow2ReadBytes(count: 40, at: offset)
            let l1Offset = QCOW2BE.u64(fixed, 0)
            let l1Size = QCOW2BE.u32(fixed, 8)
            let idLength = Int(QCOW2BE.u16(fixed, 12))
            let nameLength = Int(QCOW2BE.u16(fixed, 14))
            let extraSize = Int(QCOW2BE.u32(fixed, 36))
            guard extraSize <= QCOW2Snapshot.maxExtraData else {
                throw fail(Self.extraDataMessage(index: index))
            }
            let variable = extraSize + idLength + nameLength
            let entrySize = (40 + variable + 7) & ~7
            // The whole table is at most 64 MiB (QEMU counts the entry before padding).
            let (end, overflow) = (offset - h.snapshotsOffset).addingReportingOverflow(UInt64(40 + variable))
            guard !overflow, end <= QCOW2Snapshot.maxTableBytes else {
                throw fail(Self.tooBigMessage(overhanging: count - index))
            }
            guard offset + UInt64(40 + variable) <= fileSize else {
                throw fail("snapshot table entry \(index) at offset \(offset) extends past the end of the file")
            }
            let rest = try file.qcow2ReadBytes(count: variable, at: offset + 40)
            let extra = Array(rest[0..<extraSize])
            var vmState = UInt64(QCOW2BE.u32(fixed, 32))
            var diskSize: UInt64?
            var icount: UInt64?
            if extraSize >= 8 { vmState = QCOW2BE.u64(extra, 0) }
            if extraSize >= 16 { diskSize = QCOW2BE.u64(extra, 8) }
            if extraSize >= 24 {
                let value = QCOW2BE.u64(extra, 16)
                icount = value == .max ? nil : value
            }
            let id = Self.cString(rest[extraSize..<(extraSize + idLength)])
            let name = Self.cString(rest[(extraSize + idLength)..<variable])
            result.append(QCOW2Snapshot(
                l1TableOffset: l1Offset, l1Size: l1Size, id: id, name: name,
                dateSeconds: QCOW2BE.u32(fixed, 16), dateNanoseconds: QCOW2BE.u32(fixed, 20),
                vmClockNanoseconds: QCOW2BE.u64(fixed, 24), vmStateSize: vmState,
                diskSize: diskSize, icount: icount, extraData: extra, entrySize: entrySize))
            offset += UInt64(entrySize)
        }
        return result
    }

    /// QEMU keeps the ID and name as C strings: they end at the first NUL byte.
    static func cString(_ bytes: ArraySlice<UInt8>) -> String {
        // memchr, not prefix(while:): that one runs unspecialized per byte in debug builds,
        // seconds for a hostile table of 520 64 KiB names.
        let end = bytes.withUnsafeBytes { raw -> Int in
            // Sound: memchr reads exactly raw.count bytes of the slice's own storage.
            guard raw.count > 0, let nul = memchr(raw.baseAddress!, 0, raw.count) else { return raw.count }
            return UnsafeRawPointer(nul) - raw.baseAddress!
        }
        return QCOW2BE.string(bytes.prefix(end))
    }

    /// QEMU's sentence (and hint line) for an entry whose extra data exceeds 1 KiB.
    public static func extraDataMessage(index: Int) -> String {
        "Too much extra metadata in snapshot table entry \(index)\n"
            + "You can force-remove this extra metadata with qemu-img check -r all"
    }

    /// QEMU's sentence (and hint line) for a table larger than 64 MiB.
    public static func tooBigMessage(overhanging: Int) -> String {
        "Snapshot table is too big\n"
            + "You can force-remove all \(overhanging) overhanging snapshots with qemu-img check -r all"
    }

    /// The table as QEMU writes it: every entry with the 24 known bytes of extra data (VM
    /// state size, disk size, instruction count) followed by whatever else it kept;
    /// `diskSize` for entries that stored none.
    static func serializedTable(_ snapshots: [QCOW2Snapshot], diskSize: UInt64) -> [UInt8] {
        var table: [UInt8] = []
        for s in snapshots {
            table += [UInt8](repeating: 0, count: (8 - table.count % 8) % 8)
            let unknown = s.extraData.count > 24 ? Array(s.extraData[24...]) : []
            let idBytes = Array(FileName.bytes(of: s.id).prefix(0xffff)), nameBytes = Array(FileName.bytes(of: s.name).prefix(0xffff))
            QCOW2BE.append64(&table, s.l1TableOffset)
            QCOW2BE.append32(&table, s.l1Size)
            QCOW2BE.append16(&table, UInt16(idBytes.count))
            QCOW2BE.append16(&table, UInt16(nameBytes.count))
            QCOW2BE.append32(&table, s.dateSeconds)
            QCOW2BE.append32(&table, s.dateNanoseconds)
            QCOW2BE.append64(&table, s.vmClockNanoseconds)
            QCOW2BE.append32(&table, s.vmStateSize <= 0xffff_ffff ? UInt32(s.vmStateSize) : 0)
            QCOW2BE.append32(&table, UInt32(24 + unknown.count))
            QCOW2BE.append64(&table, s.vmStateSize)
            QCOW2BE.append64(&table, s.diskSize ?? diskSize)
            QCOW2BE.append64(&table, s.icount ?? .max)
            table += unknown + idBytes + nameBytes
        }
        return table
    }

    /// The entry as stored in a snapshot table (padded to 8 bytes).
    public func serialized() -> [UInt8] {
        var b: [UInt8] = []
        QCOW2BE.append64(&b, l1TableOffset)
        QCOW2BE.append32(&b, l1Size)
        let idBytes = FileName.bytes(of: id), nameBytes = FileName.bytes(of: name)
        QCOW2BE.append16(&b, UInt16(clamping: idBytes.count))
        QCOW2BE.append16(&b, UInt16(clamping: nameBytes.count))
        QCOW2BE.append32(&b, dateSeconds)
        QCOW2BE.append32(&b, dateNanoseconds)
        QCOW2BE.append64(&b, vmClockNanoseconds)
        QCOW2BE.append32(&b, UInt32(clamping: vmStateSize))
        QCOW2BE.append32(&b, UInt32(extraData.count))
        b.append(contentsOf: extraData)
        b.append(contentsOf: idBytes.prefix(0xffff))
        b.append(contentsOf: nameBytes.prefix(0xffff))
        b.append(contentsOf: [UInt8](repeating: 0, count: (8 - b.count % 8) % 8))
        return b
    }

    var info: SnapshotInfo {
        SnapshotInfo(id: id, name: name, vmStateSize: vmStateSize, dateSeconds: UInt64(dateSeconds),
                     dateNanoseconds: UInt64(dateNanoseconds), vmClockNanoseconds: vmClockNanoseconds,
                     icount: icount)
    }
}
