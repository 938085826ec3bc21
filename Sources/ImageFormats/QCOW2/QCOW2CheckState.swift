import DiskIO
import Glibc

/// Masks of qcow2 table entries the check needs beyond QCOW2L2Entry.swift's.
enum QCOW2CheckMask {
    /// L1 entry bits that must be zero: 0-8 and 56-62.
    static let l1Reserved: UInt64 = 0x7f00_0000_0000_01ff
    /// Standard L2 entry bits that must be zero: 1-8 and 56-61.
    static let l2Reserved: UInt64 = 0x3f00_0000_0000_01fe
    /// Refcount table entry bits that must be zero: 0-8.
    static let reftableReserved: UInt64 = 0x1ff
    static let reftableOffset: UInt64 = ~UInt64(0x1ff)
    /// Extended L2 bitmap: the allocation half (the zero half is the upper 32 bits).
    static let allAllocated: UInt64 = 0xffff_ffff
    /// Bitmap table entries.
    static let bitmapReserved: UInt64 = 0xff00_0000_0000_01fe
}

/// The refcounts a check finds by walking every structure, one per host cluster, in a compact
/// array (4 bytes per cluster, grown on demand like QEMU's in-memory refcount table).
struct QCOW2CheckCounts {
    var values: [UInt32]
    /// The largest count one entry may hold: the image's refcount width, capped by the array's.
    let limit: UInt64

    init(clusters: Int, refcountOrder: Int) {
        values = [UInt32](repeating: 0, count: clusters)
        let max: UInt64 = refcountOrder == 6 ? .max : (UInt64(1) << UInt64(1 << refcountOrder)) - 1
        limit = Swift.min(max, UInt64(UInt32.max))
    }

    var count: Int { values.count }

    subscript(cluster: Int) -> UInt64 {
        cluster < values.count ? UInt64(values[cluster]) : 0
    }

    mutating func grow(to clusters: Int) {
        if clusters > values.count {
            values.append(contentsOf: repeatElement(0, count: clusters - values.count))
        }
    }

    mutating func set(_ cluster: Int, _ value: UInt64) {
        grow(to: cluster + 1)
        values[cluster] = UInt32(truncatingIfNeeded: value)
    }

    mutating func reset() {
        for i in values.indices { values[i] = 0 }
    }
}

/// The refcounts stored in the image, read through the refcount table with a one-block
/// write-back cache (the compare and OFLAG_COPIED passes walk clusters mostly in order).
final class QCOW2StoredRefcounts {
    let file: DiskFile
    let clusterBits: UInt64
    let order: Int
    let blockBits: UInt64
    var table: [UInt64]
    private var cachedOffset: UInt64 = 0
    private var cached: [UInt64] = []
    private var dirty = false

    init(file: DiskFile, clusterBits: UInt64, order: Int, table: [UInt64]) {
        self.file = file
        self.clusterBits = clusterBits
        self.order = order
        blockBits = clusterBits + 3 - UInt64(order)
        self.table = table
    }

    /// The stored refcount of `cluster`; nil when its refcount block offset is unaligned
    /// (QEMU then reports EIO).
    func refcount(of cluster: UInt64) throws -> UInt64? {
        guard let (words, index) = try block(for: cluster) else { return 0 }
        guard let words else { return nil }
        return QCOW2TableCache.refcount(in: words, index: index, order: order)
    }

    /// Sets the stored refcount of `cluster` (its block must exist); written by `flush`.
    func setRefcount(of cluster: UInt64, to value: UInt64) throws -> Bool {
        guard let (words, index) = try block(for: cluster), words != nil else { return false }
        QCOW2TableCache.setRefcount(in: &cached, index: index, order: order, value: value)
        dirty = true
        return true
    }

    /// nil: no block covers the cluster (refcount 0); (nil, _): the block offset is unaligned.
    private func block(for cluster: UInt64) throws -> ([UInt64]?, Int)? {
        let index = cluster >> blockBits
        guard index < UInt64(table.count) else { return nil }
        let offset = table[Int(index)] & QCOW2CheckMask.reftableOffset
        if offset == 0 { return nil }
        let within = Int(cluster & ((1 << blockBits) - 1))
        if offset & ((1 << clusterBits) - 1) != 0 { return (nil, within) }
        if cached.isEmpty || cachedOffset != offset {
            try flush()
            cached = QCOW2BE.words(try file.qcow2ReadBytes(count: 1 << Int(clusterBits), at: offset))
            cachedOffset = offset
        }
        return (cached, within)
    }

    /// Writes the cached block if it changed.
    func flush() throws {
        if dirty {
            try file.qcow2Write(QCOW2BE.bytes(cached), at: cachedOffset)
            dirty = false
        }
    }

    /// Forgets the cached block (after the refcount structures were replaced).
    func drop(newTable: [UInt64]) throws {
        try flush()
        cached = []
        table = newTable
    }
}

/// One pass of the qcow2 consistency check (QEMU's qcow2_check_refcounts and
/// check_oflag_copied): the state shared by the walk, the comparison and the repairs.
final class QCOW2Checker {
    let file: DiskFile
    let path: String
    var header: QCOW2Header
    let repair: CheckRepair
    let report: (String) -> Void
    let clusterBits: UInt64
    let clusterSize: UInt64
    /// File length as QEMU sees it (whole 512-byte sectors).
    var fileLength: UInt64
    var counts: QCOW2CheckCounts
    var stored: QCOW2StoredRefcounts
    var result = ImageCheckResult()
    /// The refcount structures are broken beyond entry-by-entry repair.
    var rebuild = false
    var highestCluster: UInt64 = 0
    /// The active L1 table as read when the pass started.
    var l1: [UInt64]
    var snapshots: [QCOW2Snapshot]

    init(file: DiskFile, path: String, repair: CheckRepair, report: @escaping (String) -> Void) throws {
        self.file = file
        self.path = path
        self.repair = repair
        self.report = report
        let size = try file.size()
        fileLength = (size + 511) & ~511
        let start = try file.qcow2ReadBytes(count: 112, at: 0)
        let bits = QCOW2BE.u32(start, 20)
        var bytes = start
        if QCOW2BE.u32(start, 0) == QCOW2Header.magic,
           (QCOW2Header.minClusterBits...QCOW2Header.maxClusterBits).contains(bits) {
            bytes = try file.qcow2ReadBytes(count: 1 << Int(bits), at: 0)
        }
        header = try QCOW2Header.parse(bytes, fileSize: size, path: path)
        clusterBits = UInt64(header.clusterBits)
        clusterSize = UInt64(1) << clusterBits
        l1 = QCOW2BE.words(try file.qcow2ReadBytes(count: Int(header.l1Size) * 8, at: header.l1TableOffset))
        snapshots = try QCOW2Snapshot.readTable(file: file, header: header, fileSize: size, path: path)
        let tableBytes = Int(header.refcountTableClusters) << Int(clusterBits)
        let table = QCOW2BE.words(try file.qcow2ReadBytes(count: tableBytes, at: header.refcountTableOffset))
        stored = QCOW2StoredRefcounts(file: file, clusterBits: clusterBits, order: Int(header.refcountOrder), table: table)
        counts = QCOW2CheckCounts(clusters: Int((fileLength + clusterSize - 1) >> clusterBits), refcountOrder: Int(header.refcountOrder))
    }

    func clusters(_ bytes: UInt64) -> UInt64 { (bytes + clusterSize - 1) >> clusterBits }
    func intoCluster(_ offset: UInt64) -> UInt64 { offset & (clusterSize - 1) }

    func say(_ line: String) { report(line + "\n") }

    static func hex(_ v: UInt64) -> String { String(v, radix: 16) }

    /// Counts one reference to every cluster of [offset, offset + size) (QEMU's
    /// qcow2_inc_refcounts_imrt): a region reaching a cluster or more past the end of the file
    /// is a corruption and not counted; a count at the width's maximum is an overflow.
    func reference(_ offset: UInt64, _ size: UInt64) {
        guard size > 0 else { return }
        let (end, overflow) = offset.addingReportingOverflow(size)
        if overflow || (end > fileLength && end - fileLength >= clusterSize) {
            say("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(Self.hex(offset)) size 0x\(Self.hex(size))")
            result.corruptions += 1
            return
        }
        let first = offset >> clusterBits, last = (end - 1) >> clusterBits
        counts.grow(to: Int(last) + 1)
        for k in Int(first)...Int(last) {
            let value = UInt64(counts.values[k])
            if value >= counts.limit {
                say("ERROR: overflow cluster offset=0x\(Self.hex(UInt64(k) << clusterBits))")
                say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing")
                result.corruptions += 1
                continue
            }
            counts.values[k] = UInt32(value + 1)
        }
    }
}
