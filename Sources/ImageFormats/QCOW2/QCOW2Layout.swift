/// Where a new qcow2 image's metadata goes, computed in one pass before anything is written.
///
/// Layout (in clusters), matching what qemu-img 7.2 creates for the common cases:
///   0                header
///   1 ..< 1+R        refcount table (R clusters)
///   .. + B           refcount blocks (B blocks, contiguous, covering every cluster below)
///   .. + L           L1 table (L clusters; the file ends at the table's last byte when
///                    nothing follows, as in QEMU)
///   then, with metadata preallocation: for each L2 table, the table followed by the data
///   clusters it maps (as QEMU's preallocation places them); with an external data file, only
///   the L2 tables (guest offset == host offset in the data file).
/// With the defaults (one refcount table cluster, one block) this is exactly QEMU's layout:
/// refcount table at cluster 1, block at cluster 2, L1 at cluster 3.
struct QCOW2Layout: Equatable {
    let clusterBits: Int
    let refcountOrder: Int
    let extendedL2: Bool
    /// Virtual size in bytes.
    let size: UInt64
    /// Whether L2 tables and data clusters are allocated up front.
    let preallocate: Bool
    /// Data clusters live in an external data file (and are not refcounted).
    let externalData: Bool

    private(set) var refcountTableClusters: UInt64 = 1
    private(set) var refcountBlockCount: UInt64 = 1
    private(set) var l1Entries: UInt64 = 0
    private(set) var l1Clusters: UInt64 = 0
    /// Number of L2 tables (preallocation only).
    private(set) var l2Count: UInt64 = 0
    /// Guest data clusters (ceil(size / cluster size)).
    private(set) var dataClusters: UInt64 = 0
    /// Clusters in the qcow2 file, all with refcount 1.
    private(set) var totalClusters: UInt64 = 0

    enum Failure: Error, Equatable {
        /// The L1 table would exceed QEMU's 32 MiB limit (qemu-img reports EFBIG).
        case tooLarge
        /// The refcount table would exceed QEMU's 8 MiB limit.
        case refcountTableTooLarge
    }

    init(clusterBits: Int, refcountOrder: Int, extendedL2: Bool, size: UInt64,
         preallocate: Bool, externalData: Bool) throws(Failure) {
        self.clusterBits = clusterBits
        self.refcountOrder = refcountOrder
        self.extendedL2 = extendedL2
        self.size = size
        self.preallocate = preallocate
        self.externalData = externalData

        let cs = UInt64(1) << UInt64(clusterBits)
        let entries = QCOW2Header.l1EntriesNeeded(size: size, clusterBits: UInt32(clusterBits),
                                                  extendedL2: extendedL2)
        guard entries <= QCOW2Header.maxL1Bytes / 8 else { throw .tooLarge }
        l1Entries = entries
        l1Clusters = (entries * 8 + cs - 1) / cs
        dataClusters = size / cs + (size % cs == 0 ? 0 : 1)
        if preallocate {
            l2Count = entries
        }
        let extra = preallocate ? l2Count + (externalData ? 0 : dataClusters) : 0

        // Refcount blocks must cover every cluster, themselves and the table included; the
        // table must hold an entry per block. Grow both until they are self-consistent.
        let perBlock = UInt64((clusterSize * 8) >> refcountOrder)
        let perTableCluster = cs / 8
        var blocks: UInt64 = 1
        var tableClusters: UInt64 = 1
        while true {
            let total = 1 + tableClusters + blocks + l1Clusters + extra
            let neededBlocks = (total + perBlock - 1) / perBlock
            let neededTable = (neededBlocks + perTableCluster - 1) / perTableCluster
            if neededBlocks <= blocks && neededTable <= tableClusters {
                totalClusters = total
                break
            }
            blocks = max(blocks, neededBlocks)
            tableClusters = max(tableClusters, neededTable)
        }
        guard tableClusters * cs <= QCOW2Header.maxRefcountTableBytes else { throw .refcountTableTooLarge }
        refcountBlockCount = blocks
        refcountTableClusters = tableClusters
    }

    var clusterSize: Int { 1 << clusterBits }
    private var cs: UInt64 { UInt64(clusterSize) }

    var refcountTableOffset: UInt64 { cs }
    var refcountBlocksOffset: UInt64 { cs * (1 + refcountTableClusters) }
    /// 0 when the image has no L1 entries (size 0), as QEMU writes it.
    var l1Offset: UInt64 { l1Entries == 0 ? 0 : cs * (1 + refcountTableClusters + refcountBlockCount) }
    private var metadataEnd: UInt64 { cs * (1 + refcountTableClusters + refcountBlockCount + l1Clusters) }

    /// Guest clusters one L2 table maps.
    var l2Entries: UInt64 { cs / (extendedL2 ? 16 : 8) }

    /// Data clusters L2 table `t` maps (the last table may map fewer).
    func dataClusters(inTable t: UInt64) -> UInt64 {
        min(l2Entries, dataClusters - t * l2Entries)
    }

    /// Host offset of L2 table `t` (preallocation only).
    func l2Offset(_ t: UInt64) -> UInt64 {
        if externalData { return metadataEnd + t * cs }
        // Every table before t is followed by its full l2Entries data clusters.
        return metadataEnd + t * (1 + l2Entries) * cs
    }

    /// Host offset of guest cluster `g`'s data (preallocation only): in the qcow2 file right
    /// after its L2 table, or the guest offset itself in an external data file.
    func dataOffset(guestCluster g: UInt64) -> UInt64 {
        if externalData { return g * cs }
        let t = g / l2Entries
        return l2Offset(t) + (1 + g % l2Entries) * cs
    }

    /// The length the qcow2 file ends up with: every allocated cluster when preallocating
    /// (data clusters stay holes unless falloc/full fill them), else the end of the L1 table.
    var fileLength: UInt64 {
        if preallocate && l2Count > 0 { return totalClusters * cs }
        if l1Entries > 0 { return l1Offset + l1Entries * 8 }
        return metadataEnd
    }

    // MARK: - Table contents

    /// The refcount table: one entry per block.
    func refcountTableBytes() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(refcountTableClusters * cs))
        for i in 0..<refcountBlockCount {
            QCOW2BE.put64(&bytes, Int(i * 8), refcountBlocksOffset + i * cs)
        }
        return bytes
    }

    /// Refcount entries one block holds.
    var refcountsPerBlock: UInt64 { (cs * 8) >> UInt64(refcountOrder) }

    /// Refcount blocks `first ..< first + count`, with refcount 1 for every cluster they cover
    /// below totalClusters. Callers write the blocks a bounded chunk at a time: all of them
    /// together are 2 bytes per cluster with 16-bit refcounts, 32 GiB for a 1 PiB image.
    func refcountBlockBytes(first: UInt64, count: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(count * cs))
        let start = first * refcountsPerBlock
        let covered = totalClusters > start ? min(totalClusters - start, count * refcountsPerBlock) : 0
        QCOW2Layout.setRefcountsToOne(&bytes, count: Int(covered), order: refcountOrder)
        return bytes
    }

    /// Sets the first `count` entries of consecutive refcount blocks to 1. Entries are
    /// big-endian for widths of 8 bits and more; narrower ones fill each byte from its least
    /// significant bit (the spec's rule).
    static func setRefcountsToOne(_ bytes: inout [UInt8], count: Int, order: Int) {
        let bits = 1 << order
        if bits >= 8 {
            let width = bits / 8
            for i in 0..<count { bytes[i * width + width - 1] = 1 }
            return
        }
        let perByte = 8 / bits
        var pattern: UInt8 = 0
        for k in 0..<perByte { pattern |= 1 << UInt8(k * bits) }
        let fullBytes = count / perByte
        for i in 0..<fullBytes { bytes[i] = pattern }
        for k in 0..<(count % perByte) { bytes[fullBytes] |= 1 << UInt8(k * bits) }
    }

    /// The L1 table bytes (l1Entries * 8, not padded to a cluster).
    func l1Bytes() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(l1Entries * 8))
        if preallocate {
            for t in 0..<l2Count {
                QCOW2BE.put64(&bytes, Int(t * 8), QCOW2L1Entry(l2Offset: l2Offset(t), copied: true).raw)
            }
        }
        return bytes
    }

    /// L2 table `t` (preallocation): every data cluster mapped with the COPIED flag. With
    /// extended L2 entries the subcluster bitmap stays 0 (allocated host cluster, no subcluster
    /// marked allocated), which is what QEMU's metadata preallocation writes.
    func l2Bytes(_ t: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: clusterSize)
        let stride = extendedL2 ? 16 : 8
        let first = t * l2Entries
        bytes.withUnsafeMutableBytes { raw in
            for j in 0..<dataClusters(inTable: t) {
                let entry = QCOW2L2Entry.standard(hostOffset: dataOffset(guestCluster: first + j), copied: true)
                // Sound: j < l2Entries, so j * stride + 8 <= clusterSize == raw.count.
                raw.storeBytes(of: entry.raw.bigEndian, toByteOffset: Int(j) * stride, as: UInt64.self)
            }
        }
        return bytes
    }
}
