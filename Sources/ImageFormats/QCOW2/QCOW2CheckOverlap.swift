import Glibc

/// QEMU's metadata overlap check ("cached" mode, qemu-img's default) before every write a
/// repair makes: a write that would land on metadata of another kind (a table pointing at
/// itself, an L1 entry that is also an L2 table...) is refused, the image is marked corrupt and
/// the check fails, exactly where QEMU refuses, so a repair never overwrites live metadata.
extension QCOW2Checker {
    enum MetadataKind: Int, CaseIterable {
        case header, activeL1, activeL2, refcountTable, refcountBlock, snapshotTable, inactiveL1, bitmapDirectory

        var name: String {
            switch self {
            case .header: return "qcow2_header"
            case .activeL1: return "active L1 table"
            case .activeL2: return "active L2 table"
            case .refcountTable: return "refcount table"
            case .refcountBlock: return "refcount block"
            case .snapshotTable: return "snapshot table"
            case .inactiveL1: return "inactive L1 table"
            case .bitmapDirectory: return "bitmap directory"
            }
        }
    }

    struct OverlapRefused: Error {}

    /// Refuses (after signalling the corruption) a write of `size` bytes at `offset` that
    /// touches a cluster of metadata other than `ignore`.
    func checkOverlap(ignoring ignore: MetadataKind?, offset: UInt64, size: UInt64) throws {
        guard size > 0 else { return }
        let start = offset & ~(clusterSize - 1)
        let end = (offset + size + clusterSize - 1) & ~(clusterSize - 1)
        func hits(_ o: UInt64, _ s: UInt64) -> Bool { s > 0 && o < end && start < o &+ s }
        for kind in MetadataKind.allCases where kind != ignore {
            var overlaps = false
            switch kind {
            case .header: overlaps = hits(0, clusterSize)
            case .activeL1: overlaps = hits(header.l1TableOffset, UInt64(header.l1Size) * 8)
            case .activeL2: overlaps = l1.contains { hits($0 & qcow2OffsetMask, $0 & qcow2OffsetMask == 0 ? 0 : clusterSize) }
            case .refcountTable:
                overlaps = hits(header.refcountTableOffset, UInt64(header.refcountTableClusters) << clusterBits)
            case .refcountBlock:
                overlaps = stored.table.contains {
                    hits($0 & QCOW2CheckMask.reftableOffset, $0 & QCOW2CheckMask.reftableOffset == 0 ? 0 : clusterSize)
                }
            case .snapshotTable:
                overlaps = hits(header.snapshotsOffset, UInt64(snapshots.reduce(0) { $0 + $1.entrySize }))
            case .inactiveL1:
                // Snapshot L1 tables as the entries give them, however bogus (QEMU's cached mode).
                overlaps = snapshots.contains { hits($0.l1TableOffset, UInt64($0.l1Size) * 8) }
            case .bitmapDirectory:
                if header.autoclearFeatures & QCOW2Header.autoclearBitmaps != 0,
                   let ext = header.bitmapsExtension, ext.count >= 24, QCOW2BE.u32(ext, 0) > 0 {
                    overlaps = hits(QCOW2BE.u64(ext, 16), QCOW2BE.u64(ext, 8))
                }
            }
            if overlaps {
                try signalCorruption("Preventing invalid write on metadata (overlaps with \(kind.name))")
                throw OverlapRefused()
            }
        }
    }
}
