import DiskIO
import Foundation
import Testing
@testable import ImageFormats

/// The one-pass layout of new images, and refcount entries of every width.
@Suite struct QCOW2CreateLayoutTests {
    func layout(bits: Int = 16, order: Int = 4, size: UInt64, prealloc: Bool = false,
                external: Bool = false, extended: Bool = false) throws -> QCOW2Layout {
        try QCOW2Layout(clusterBits: bits, refcountOrder: order, extendedL2: extended, size: size,
                        preallocate: prealloc, externalData: external)
    }

    @Test func defaultMatchesQemu() throws {
        let l = try layout(size: 1 << 30)
        #expect(l.refcountTableOffset == 0x10000 && l.refcountTableClusters == 1)
        #expect(l.refcountBlocksOffset == 0x20000 && l.refcountBlockCount == 1)
        #expect(l.l1Offset == 0x30000 && l.l1Entries == 2)
        #expect(l.fileLength == 0x30000 + 16)  // qemu-img's 196624 bytes
        #expect(l.totalClusters == 4)
    }

    @Test func emptyImageHasNoL1() throws {
        let l = try layout(size: 0)
        #expect(l.l1Entries == 0 && l.l1Offset == 0)
        #expect(l.fileLength == 3 * 65536)
    }

    @Test func metadataPreallocationCountsEveryCluster() throws {
        let l = try layout(size: 1 << 30, prealloc: true)
        #expect(l.l2Count == 2 && l.dataClusters == 16384)
        #expect(l.totalClusters == 16390)  // what qemu-img makes
        #expect(l.l2Offset(0) == 0x40000 && l.dataOffset(guestCluster: 0) == 0x50000)
        #expect(l.l2Offset(1) == 0x40000 + 8193 * 0x10000)
        #expect(l.fileLength == 16390 * 65536)
        let ext = try layout(size: 10 << 20, prealloc: true, external: true)
        #expect(ext.totalClusters == 5 && ext.dataOffset(guestCluster: 7) == 7 * 65536)
    }

    /// Refcount table and block counts for various sizes and widths: blocks cover every
    /// cluster (themselves included) and the table holds an entry per block.
    static let layoutCases: [(Int, Int, UInt64, Bool)] = [
        (9, 6, UInt64(20) << 30, false), (12, 0, UInt64(300) << 20, true), (16, 4, UInt64(256) << 30, true),
        (16, 6, UInt64(1) << 40, true), (9, 4, UInt64(1) << 30, true), (21, 0, UInt64(1) << 50, false),
        (16, 3, UInt64(256) << 40, false), (10, 5, UInt64(1) << 20, false),
    ]

    @Test(arguments: layoutCases)
    func refcountStructuresCoverThemselves(_ bits: Int, _ order: Int, _ size: UInt64, _ prealloc: Bool) throws {
        let l = try layout(bits: bits, order: order, size: size, prealloc: prealloc)
        let cs = UInt64(1) << UInt64(bits)
        let perBlock = (cs * 8) >> UInt64(order)
        #expect(l.refcountBlockCount * perBlock >= l.totalClusters)
        #expect((l.refcountBlockCount - 1) * perBlock < l.totalClusters)  // no spare block
        #expect(l.refcountTableClusters * cs / 8 >= l.refcountBlockCount)
        #expect((l.refcountTableClusters - 1) * cs / 8 < l.refcountBlockCount)
        var expected = 1 + l.refcountTableClusters + l.refcountBlockCount + l.l1Clusters
        if prealloc { expected += l.l2Count + l.dataClusters }
        #expect(l.totalClusters == expected)
    }

    /// Refcount blocks are produced a chunk at a time (all at once they can be tens of GiB):
    /// every block reads refcount 1 exactly for the clusters below totalClusters.
    @Test(arguments: [(9, 6), (9, 0), (12, 6)])
    func refcountBlocksInChunks(_ bits: Int, _ order: Int) throws {
        let l = try layout(bits: bits, order: order, size: 8 << 20, prealloc: true)
        #expect(l.refcountBlockCount > 3)
        var counted: UInt64 = 0
        for block in 0..<l.refcountBlockCount {
            let words = QCOW2BE.words(l.refcountBlockBytes(first: block, count: 1))
            for i in 0..<Int(l.refcountsPerBlock) {
                let cluster = block * l.refcountsPerBlock + UInt64(i)
                let value = QCOW2TableCache.refcount(in: words, index: i, order: order)
                #expect(value == (cluster < l.totalClusters ? 1 : 0))
                counted += value
            }
        }
        #expect(counted == l.totalClusters)
        // A chunk of several blocks equals those blocks one by one.
        let together = l.refcountBlockBytes(first: 1, count: 3)
        let apart = (1...3).flatMap { l.refcountBlockBytes(first: UInt64($0), count: 1) }
        #expect(together == apart)
    }

    @Test func limits() {
        // 512-byte clusters map at most 128 GiB with a 32 MiB L1 table.
        #expect(throws: QCOW2Layout.Failure.tooLarge) { try layout(bits: 9, size: (128 << 30) + 512) }
        #expect(throws: Never.self) { try layout(bits: 9, size: 128 << 30) }
        #expect(throws: QCOW2Layout.Failure.tooLarge) { try layout(size: (2 << 50) + 65536) }
        #expect(throws: QCOW2Layout.Failure.tooLarge) { try layout(size: (1 << 50) + 65536, extended: true) }
    }

    /// Refcount entries of widths 1..64: the layout's encoder, the table cache's decoder and
    /// setter agree, and neighbouring entries are untouched.
    @Test(arguments: [0, 1, 2, 3, 4, 5, 6])
    func refcountEntriesOfEveryWidth(_ order: Int) {
        let clusterBytes = 512
        var bytes = [UInt8](repeating: 0, count: clusterBytes)
        let perBlock = (clusterBytes * 8) >> order
        let count = perBlock - 3
        QCOW2Layout.setRefcountsToOne(&bytes, count: count, order: order)
        var words = QCOW2BE.words(bytes)
        for i in 0..<perBlock {
            #expect(QCOW2TableCache.refcount(in: words, index: i, order: order) == (i < count ? 1 : 0))
        }
        let bits = 1 << order
        let max: UInt64 = bits == 64 ? .max : (1 << UInt64(bits)) - 1
        QCOW2TableCache.setRefcount(in: &words, index: 5, order: order, value: max)
        #expect(QCOW2TableCache.refcount(in: words, index: 5, order: order) == max)
        #expect(QCOW2TableCache.refcount(in: words, index: 4, order: order) == 1)
        #expect(QCOW2TableCache.refcount(in: words, index: 6, order: order) == 1)
        // Sub-byte entries fill bytes from the least significant bit (spec).
        if bits < 8 {
            let encoded = QCOW2BE.bytes(words)
            let bitOffset = 5 * bits
            #expect((encoded[bitOffset / 8] >> UInt8(bitOffset % 8)) & UInt8(max) == UInt8(max))
        } else {
            // Multi-byte entries are big-endian: the last byte is the least significant.
            let encoded = QCOW2BE.bytes(words)
            #expect(encoded[6 * bits / 8 - 1] == 0xff)
            #expect(encoded[7 * bits / 8 - 1] == 1)
        }
    }

    /// QCOW2Refcounts on real files: reading, raising to the width's maximum, overflow refused,
    /// allocation past the first block and table growth.
    @Test(arguments: [0, 2, 4, 6])
    func refcountsOnAnImage(_ order: Int) throws {
        let dir = NSTemporaryDirectory() + "simg-rc-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/r.qcow2"
        try ImageCreator.create(CreateRequest(format: .qcow2, path: path, size: 1 << 20, options: [
            CreateOption(name: "cluster_size", value: "512"),
            CreateOption(name: "refcount_bits", value: String(1 << order)),
        ])) { _ in }
        let image = try QCOW2Image.open(path: path, writable: true)
        defer { try? image.close() }
        let state = try image.writer()
        let rc = state.refcounts
        for c in 0..<4 { #expect(try rc.refcount(ofCluster: UInt64(c)) == 1) }
        #expect(try rc.refcount(ofCluster: 4) == 0)
        let bits = 1 << order
        let max: UInt64 = bits == 64 ? .max : (1 << UInt64(bits)) - 1
        if bits < 64 {
            try rc.adjust(cluster: 2, by: Int64(max - 1))
            #expect(try rc.refcount(ofCluster: 2) == max)
            #expect(throws: ImageError.self) { try rc.adjust(cluster: 2, by: 1) }
            try rc.adjust(cluster: 2, by: -Int64(max - 1))
        }
        #expect(throws: ImageError.self) { try rc.adjust(cluster: 4, by: -1) }
        // Allocate well past the first block (and, for 1-bit entries, past the first table).
        var last: UInt64 = 0
        for _ in 0..<200 {
            let (offset, _) = try rc.allocate(count: 37)
            #expect(offset > last)
            last = offset
            for k in 0..<37 { #expect(try rc.refcount(ofCluster: offset / 512 + UInt64(k)) == 1) }
        }
        try image.flush()
        // The clusters are leaked (nothing references them) but refcounts are consistent:
        // qemu-img check -r leaks would fix it; here it is enough that the structure parses.
        let reopened = try QCOW2Image.open(path: path, writable: true)
        defer { try? reopened.close() }
        let rc2 = try reopened.writer().refcounts
        #expect(try rc2.refcount(ofCluster: last / 512) == 1)
        #expect(try rc2.refcount(ofCluster: last / 512 + 37) == 0)
    }
}
