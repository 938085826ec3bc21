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

/// The refcounts a check finds by walking every structure, one per host cluster (4 bytes
/// each, like QEMU's in-memory refcount table), stored in pages of 1024 clusters (4 KiB, one
/// memory page) allocated on the first count in them. QEMU keeps one array over the whole file;
/// a repair that grows a 10 KB file to 100 GB to reach a refcount block far past its end (as
/// QEMU's does) would make that 800 MB of zeros walked several times. Pages keep the memory
/// and the time proportional to the clusters the image references: the empty tail costs
/// nothing, and references scattered over it cost at most a memory page each, what the kernel
/// would charge for touching one array anyway. Manually allocated so the hot loops index it
/// without Swift's per-access exclusivity and uniqueness checks.
final class QCOW2CheckCounts {
    static let pageBits = 10
    static let pageSize = 1 << pageBits
    /// Clusters the counts cover (every one below reads 0 until counted).
    private(set) var count: Int
    /// One slot per page of `count`, nil until a count lands in the page.
    private var pages: UnsafeMutablePointer<UnsafeMutablePointer<UInt32>?>
    private var pageSlots: Int
    /// The largest count one entry may hold: the image's refcount width, capped by the array's.
    let limit: UInt64

    /// Most clusters covered (the page table, sized to `count`, is then 2^22 slots: 32 MiB).
    /// The count follows the file's length, which a hostile image or a repair of one can make
    /// huge: past this, or when memory runs out, the check fails with ENOMEM as QEMU's
    /// g_try_realloc does, instead of trapping.
    static let maxClusters = 1 << 32

    /// For counts known to be small (unit tests): traps if the memory cannot be had.
    convenience init(clusters: Int, refcountOrder: Int) {
        self.init(trying: clusters, refcountOrder: refcountOrder)!
    }

    /// Nil when the memory cannot be had (the size follows the file: the check uses this one).
    init?(trying clusters: Int, refcountOrder: Int) {
        let slots = Self.slots(for: Swift.max(clusters, 1))
        guard clusters <= Self.maxClusters,
              let memory = calloc(slots, MemoryLayout<UnsafeMutablePointer<UInt32>?>.stride) else { return nil }
        // Sound: calloc returned zeroed memory for `slots` optional pointers (all-zero bytes
        // are nil); freed in deinit with the pages they point at.
        pages = memory.bindMemory(to: UnsafeMutablePointer<UInt32>?.self, capacity: slots)
        pageSlots = slots
        count = clusters
        let max: UInt64 = refcountOrder == 6 ? .max : (UInt64(1) << UInt64(1 << refcountOrder)) - 1
        limit = Swift.min(max, UInt64(UInt32.max))
    }

    deinit {
        freePages()
        free(pages)
    }

    private static func slots(for clusters: Int) -> Int { (clusters + pageSize - 1) >> pageBits }

    private func freePages() {
        // Sound: every slot below pageSlots is initialized (nil or a page of ours).
        for i in 0..<pageSlots {
            if let page = pages[i] {
                free(page)
                pages[i] = nil
            }
        }
    }

    subscript(cluster: Int) -> UInt64 {
        guard cluster >= 0 && cluster < count else { return 0 }
        // Sound: cluster < count, so its page slot is below pageSlots; a page holds pageSize entries.
        guard let page = pages[cluster >> Self.pageBits] else { return 0 }
        return UInt64(page[cluster & (Self.pageSize - 1)])
    }

    /// Whether any cluster of the page holding `cluster` was counted (below `count`).
    func pageIsUsed(_ cluster: Int) -> Bool {
        guard cluster >= 0 && cluster < count else { return false }
        // Sound: cluster < count, so its page slot is below pageSlots.
        return pages[cluster >> Self.pageBits] != nil
    }

    /// The first cluster after `cluster` that may hold a nonzero count: the next one, or the
    /// start of the next page when this page was never counted in.
    func nextCandidate(after cluster: Int) -> Int {
        pageIsUsed(cluster) ? cluster + 1 : (cluster >> Self.pageBits + 1) << Self.pageBits
    }

    /// Whether every count in `range` (clamped to `count`) is zero without looking at a page
    /// nothing was counted in.
    func allZero(_ range: Range<Int>) -> Bool {
        var i = Swift.max(range.lowerBound, 0)
        let end = Swift.min(range.upperBound, count)
        while i < end {
            let pageEnd = Swift.min((i >> Self.pageBits + 1) << Self.pageBits, end)
            // Sound: i < count: its page slot is below pageSlots, entries i..<pageEnd inside the page.
            if let page = pages[i >> Self.pageBits] {
                for k in i..<pageEnd where page[k & (Self.pageSize - 1)] != 0 { return false }
            }
            i = pageEnd
        }
        return true
    }

    /// The entry of `cluster` (below `count`), its page allocated (zeroed) if it had none; nil
    /// when the memory cannot be had.
    @inline(__always)
    func slot(_ cluster: Int) -> UnsafeMutablePointer<UInt32>? {
        // Sound: callers pass 0 <= cluster < count, so the page slot is below pageSlots.
        if let page = pages[cluster >> Self.pageBits] { return page + (cluster & (Self.pageSize - 1)) }
        guard let memory = calloc(Self.pageSize, MemoryLayout<UInt32>.stride) else { return nil }
        // Sound: calloc returned zeroed memory for pageSize UInt32s (zero bytes are valid
        // values); freed by freePages.
        let page = memory.bindMemory(to: UInt32.self, capacity: Self.pageSize)
        pages[cluster >> Self.pageBits] = page
        return page + (cluster & (Self.pageSize - 1))
    }

    /// Makes `clusters` entries valid; false (nothing changed) when the memory cannot be had.
    @discardableResult
    func grow(to clusters: Int) -> Bool {
        guard clusters > count else { return true }
        guard clusters <= Self.maxClusters else { return false }
        let slots = Self.slots(for: clusters)
        if slots > pageSlots {
            let newSlots = Swift.max(slots, Swift.min(pageSlots * 2, Self.slots(for: Self.maxClusters)))
            guard let memory = realloc(pages, newSlots * MemoryLayout<UnsafeMutablePointer<UInt32>?>.stride) else {
                return false
            }
            // Sound: realloc kept the first `pageSlots` slots; the new ones are set to nil here.
            pages = memory.bindMemory(to: UnsafeMutablePointer<UInt32>?.self, capacity: newSlots)
            (pages + pageSlots).initialize(repeating: nil, count: newSlots - pageSlots)
            pageSlots = newSlots
        }
        count = clusters
        return true
    }

    /// Sets a count; nothing happens if the array cannot grow to hold it.
    func set(_ cluster: Int, _ value: UInt64) {
        guard cluster >= 0, grow(to: cluster + 1), let entry = slot(cluster) else { return }
        entry.pointee = UInt32(truncatingIfNeeded: value)
    }

    /// Every count back to zero (the pages given back).
    func reset() {
        freePages()
    }
}

/// Entries of a refcount block as stored (raw bytes), for refcount_bits = 1 << order: sub-byte
/// widths count from the least significant bit of each byte, wider ones are big-endian.
enum QCOW2RefcountEntry {
    @inline(__always)
    static func get(_ b: [UInt8], _ i: Int, order: Int) -> UInt64 {
        switch order {
        case 4: return UInt64(b[2 * i]) << 8 | UInt64(b[2 * i + 1])
        case 3: return UInt64(b[i])
        case 0, 1, 2:
            let bits = 1 << order, bit = i * bits
            return UInt64(b[bit >> 3] >> UInt8(bit & 7)) & ((1 << UInt64(bits)) - 1)
        default:
            let width = 1 << (order - 3)
            var v: UInt64 = 0
            for k in 0..<width { v = v << 8 | UInt64(b[i * width + k]) }
            return v
        }
    }

    static func set(_ b: inout [UInt8], _ i: Int, order: Int, value: UInt64) {
        if order < 3 {
            let bits = 1 << order, bit = i * bits
            let mask = UInt8((1 << bits) - 1) << UInt8(bit & 7)
            b[bit >> 3] = (b[bit >> 3] & ~mask) | (UInt8(truncatingIfNeeded: value) << UInt8(bit & 7)) & mask
            return
        }
        let width = 1 << (order - 3)
        for k in 0..<width {
            b[i * width + k] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - k)))
        }
    }
}

/// What covers a range of clusters in the stored refcount structure.
enum QCOW2StoredBlock {
    /// No refcount block: every refcount is 0.
    case none
    /// The table entry's block offset is not cluster-aligned (QEMU: EIO for every cluster).
    case unaligned
    case bytes([UInt8])
}

/// The refcounts stored in the image, read through the refcount table with a one-block
/// write-back cache (the compare and OFLAG_COPIED passes walk clusters mostly in order).
final class QCOW2StoredRefcounts {
    let file: DiskFile
    let clusterBits: UInt64
    let order: Int
    let blockBits: UInt64
    var table: [UInt64]
    private var cachedIndex = -1
    private var cachedOffset: UInt64 = 0
    private var cached: [UInt8] = []
    private var dirty = false
    /// Called once, at the first unaligned block offset met (QEMU reports the corruption once).
    var unalignedSignal: ((_ index: Int, _ offset: UInt64) throws -> Void)?

    init(file: DiskFile, clusterBits: UInt64, order: Int, table: [UInt64]) {
        self.file = file
        self.clusterBits = clusterBits
        self.order = order
        blockBits = clusterBits + 3 - UInt64(order)
        self.table = table
    }

    /// The block of refcount table entry `index` (zeros past the end of the file).
    func block(_ index: Int) throws -> QCOW2StoredBlock {
        if index == cachedIndex { return .bytes(cached) }
        guard index >= 0 && index < table.count else { return .none }
        let offset = table[index] & QCOW2CheckMask.reftableOffset
        if offset == 0 { return .none }
        if offset & ((1 << clusterBits) - 1) != 0 {
            if let signal = unalignedSignal {
                unalignedSignal = nil
                try signal(index, offset)
            }
            return .unaligned
        }
        try flush()
        cached = try file.qcow2ReadBytes(count: 1 << Int(clusterBits), at: offset)
        cachedIndex = index
        cachedOffset = offset
        return .bytes(cached)
    }

    /// Whether table entry `index` points at no block (offset 0 or past the table), so every
    /// refcount it covers is 0; answered without reading anything.
    func hasNoBlock(_ index: Int) -> Bool {
        index != cachedIndex && (index < 0 || index >= table.count || table[index] & QCOW2CheckMask.reftableOffset == 0)
    }

    /// The stored refcount of `cluster`; nil when its refcount block offset is unaligned
    /// (QEMU then reports EIO).
    func refcount(of cluster: UInt64) throws -> UInt64? {
        switch try block(Int(clamping: cluster >> blockBits)) {
        case .none: return 0
        case .unaligned: return nil
        case .bytes(let b): return QCOW2RefcountEntry.get(b, Int(cluster & ((1 << blockBits) - 1)), order: order)
        }
    }

    /// Sets the stored refcount of `cluster` if a block covers it; written by `flush`.
    func setRefcount(of cluster: UInt64, to value: UInt64) throws -> Bool {
        let index = Int(clamping: cluster >> blockBits)
        guard case .bytes = try block(index) else { return false }
        QCOW2RefcountEntry.set(&cached, Int(cluster & ((1 << blockBits) - 1)), order: order, value: value)
        dirty = true
        return true
    }

    /// Writes the cached block if it changed.
    func flush() throws {
        if dirty {
            try file.qcow2Write(cached, at: cachedOffset)
            dirty = false
        }
    }

    /// Forgets the cached block (after the refcount structures were replaced).
    func drop(newTable: [UInt64]) throws {
        try flush()
        cached = []
        cachedIndex = -1
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
    /// qemu-img's own error lines (printed "PROGRAM: MESSAGE").
    var reportError: (String) -> Void = { _ in }
    let clusterBits: UInt64
    let clusterSize: UInt64
    /// File length as QEMU sees it (whole 512-byte sectors).
    var fileLength: UInt64
    let counts: QCOW2CheckCounts
    var stored: QCOW2StoredRefcounts
    var result = ImageCheckResult()
    /// The refcount structures are broken beyond entry-by-entry repair.
    var rebuild = false
    var highestCluster: UInt64 = 0
    /// The active L1 table as read when the pass started.
    var l1: [UInt64]
    var snapshots: [QCOW2Snapshot]
    /// What reading the snapshot table found (QEMU keeps it apart from the refcount result).
    var snapshotResult = ImageCheckResult()
    /// QEMU reports a corruption once per opened image; later ones are silent.
    var signaledCorruption = false

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
        // Like QEMU in check mode, open without the snapshot table (its header fields are
        // checked, and the table read, by readSnapshotTable).
        let snapshotFields = Array(bytes[60..<72])
        bytes.replaceSubrange(60..<72, with: [UInt8](repeating: 0, count: 12))
        header = try QCOW2Header.parse(bytes, fileSize: size, path: path)
        header.nbSnapshots = QCOW2BE.u32(snapshotFields, 0)
        header.snapshotsOffset = QCOW2BE.u64(snapshotFields, 4)
        clusterBits = UInt64(header.clusterBits)
        clusterSize = UInt64(1) << clusterBits
        l1 = QCOW2BE.words(try file.qcow2ReadBytes(count: Int(header.l1Size) * 8, at: header.l1TableOffset))
        snapshots = []
        let tableBytes = Int(header.refcountTableClusters) << Int(clusterBits)
        let table = QCOW2BE.words(try file.qcow2ReadBytes(count: tableBytes, at: header.refcountTableOffset))
        stored = QCOW2StoredRefcounts(file: file, clusterBits: clusterBits, order: Int(header.refcountOrder), table: table)
        // QEMU refuses to count more than INT_MAX host clusters (a 1 TiB file of 512-byte
        // clusters): "Check failed: File too large". Counting them would take many seconds.
        let hostClusters = (fileLength + clusterSize - 1) >> clusterBits
        guard hostClusters <= UInt64(Int32.max) else {
            var result = ImageCheckResult()
            result.checkErrors = 1
            throw ImageCheckFailure(errno: EFBIG, result: result)
        }
        guard let counts = QCOW2CheckCounts(trying: Int(hostClusters),
                                            refcountOrder: Int(header.refcountOrder)) else {
            throw ImageCheckFailure(errno: ENOMEM, result: ImageCheckResult())
        }
        self.counts = counts
        stored.unalignedSignal = { [unowned self] index, offset in try self.signalCorruption(
            "Refblock offset 0x\(Self.hex(offset)) unaligned (reftable index: \(index == 0 ? "0" : "0x" + Self.hex(UInt64(index))))") }
    }

    /// QEMU's qcow2_signal_corruption: a read-only check only says so; a repairing one marks
    /// the image corrupt (the repair clears the bit again once the image checks clean).
    func signalCorruption(_ message: String) throws {
        if signaledCorruption { return }
        signaledCorruption = true
        if repair == .none {
            say("qcow2: Image is corrupt: \(message); further non-fatal corruption events will be suppressed")
            return
        }
        say("qcow2: Marking image as corrupt: \(message); further corruption events will be suppressed")
        header.incompatibleFeatures |= QCOW2Header.incompatibleCorrupt
        if header.version >= 3 {
            var field: [UInt8] = []
            QCOW2BE.append64(&field, header.incompatibleFeatures)
            try file.qcow2Write(field, at: 72)
            try file.sync()
        }
    }

    /// Stops a repairing check at a clean point after SIGINT/SIGTERM (polled once per L2
    /// table or refcount block: well within a second). Every repair write leaves a valid
    /// image on its own, so stopping between them is safe; the refcount block whose fixes
    /// are still cached is written first, so what was repaired stays repaired.
    func stopIfInterrupted() throws {
        guard Interruption.isPending else { return }
        if repair != .none { try stored.flush() }
        try Interruption.check(image: path, outcome: repair == .none
            ? "was not checked completely"
            : "may be only partly repaired; run the check with -r again")
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
        guard counts.grow(to: Int(last) + 1) else {
            result.checkErrors += 1
            return
        }
        for k in Int(first)...Int(last) {
            // grow made every index up to `last` valid.
            guard let entry = counts.slot(k) else {
                result.checkErrors += 1
                return
            }
            let value = UInt64(entry.pointee)
            if value >= counts.limit {
                say("ERROR: overflow cluster offset=0x\(Self.hex(UInt64(k) << clusterBits))")
                say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing")
                result.corruptions += 1
                continue
            }
            entry.pointee = UInt32(value + 1)
        }
    }
}
