import Foundation
import Testing
import DiskIO
@testable import ImageFormats

/// The read path on small images assembled by hand (no qemu needed): every L2 entry kind,
/// merging in blockStatus, backing files shorter than the image, and corrupt entries.
@Suite struct QCOW2ReadUnitTests {
    static let c: UInt64 = 65536

    /// `bytes` compressed as one cluster of `bytes.count` bytes, as the write path compresses
    /// it (`QCOW2ClusterCompressor`); nil when the stream would not be shorter.
    static func compressed(_ codec: QCOW2Compression, _ bytes: [UInt8]) throws -> [UInt8]? {
        let compressor = try QCOW2ClusterCompressor(codec: codec, clusterSize: bytes.count)
        // The stream lies in the compressor's buffer: copied out while the compressor lives.
        return withExtendedLifetime(compressor) { bytes.withUnsafeBytes { compressor.compress($0).map(Array.init) } }
    }

    /// Writes a v3 image with 64 KiB clusters, size 16 clusters, one L2 table at 0x30000.
    static func makeImage(at path: String, extendedL2: Bool = false, l2: [UInt64],
                          data: [(UInt64, [UInt8])], backing: String? = nil,
                          snapshotTable: (count: UInt32, bytes: [UInt8])? = nil) throws {
        var h = QCOW2Header(version: 3, clusterBits: 16, size: 16 * c)
        h.l1Size = 1
        h.l1TableOffset = 0x20000
        h.refcountTableOffset = 0x10000
        h.refcountTableClusters = 1
        if extendedL2 { h.incompatibleFeatures |= QCOW2Header.incompatibleExtendedL2 }
        h.backingFileName = backing
        if let snapshotTable {
            h.nbSnapshots = snapshotTable.count
            h.snapshotsOffset = 0x80000
        }
        let file = try DiskFile.create(path)
        defer { file.close() }
        try file.write(h.serialized(), at: 0)
        try file.write(QCOW2BE.bytes([QCOW2L1Entry(l2Offset: 0x30000, copied: true).raw]), at: 0x20000)
        var table = l2
        table += [UInt64](repeating: 0, count: Int(c / 8) - table.count)
        try file.write(QCOW2BE.bytes(table), at: 0x30000)
        for (offset, bytes) in data { try file.write(bytes, at: offset) }
        if let snapshotTable { try file.write(snapshotTable.bytes, at: 0x80000) }
        try file.truncate(to: 0xa0000)
    }

    static func pattern(_ seed: UInt8, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: Int(seed) &+ $0 / 7) }
    }

    static func readAll(_ image: any DiskImage) throws -> [UInt8] {
        var all = [UInt8](repeating: 0xcc, count: Int(image.virtualSize))
        // Odd chunk sizes so reads start and end inside clusters.
        var offset = 0
        while offset < all.count {
            let n = min(40_000, all.count - offset)
            try all.withUnsafeMutableBytes {
                try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[offset..<(offset + n)]), at: UInt64(offset))
            }
            offset += n
        }
        return all
    }

    static func extents(_ image: any DiskImage) throws -> [Extent] {
        var result: [Extent] = []
        var offset: UInt64 = 0
        while offset < image.virtualSize {
            let e = try image.blockStatus(at: offset, length: image.virtualSize - offset)
            result.append(e)
            offset = e.end
        }
        return result
    }

    @Test func everyEntryKind() throws {
        let dir = NSTemporaryDirectory() + "qcow2-unit-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let c = Self.c
        let a = Self.pattern(1, Int(2 * c)), b = Self.pattern(9, Int(c))
        let plain = Self.pattern(50, Int(c))
        let compressed = try #require(try Self.compressed(.zlib, plain))
        let desc = QCOW2CompressedDescriptor.covering(hostOffset: 0x70010, length: UInt64(compressed.count) + 700)
        let l2: [UInt64] = [
            QCOW2L2Entry.standard(hostOffset: 0x40000, copied: true).raw,
            QCOW2L2Entry.standard(hostOffset: 0x50000, copied: true).raw,
            QCOW2L2Entry.standard(hostOffset: 0, copied: false, zero: true).raw,
            QCOW2L2Entry.standard(hostOffset: 0x60000, copied: true, zero: true).raw,
            QCOW2L2Entry.compressed(desc, clusterBits: 16).raw,
            0,
            QCOW2L2Entry.standard(hostOffset: 0x90000, copied: true).raw,
        ]
        let path = dir + "/a.qcow2"
        try Self.makeImage(at: path, l2: l2, data: [
            (0x40000, a), (0x60000, [UInt8](repeating: 0xee, count: Int(c))),
            (0x70010, compressed + [UInt8](repeating: 0xab, count: 700)), (0x90000, b)])
        let image = try QCOW2Image.open(path: path)
        defer { try? image.close() }

        var expected = a + [UInt8](repeating: 0, count: Int(2 * c)) + plain
        expected += [UInt8](repeating: 0, count: Int(c)) + b + [UInt8](repeating: 0, count: Int(9 * c))
        #expect(try Self.readAll(image) == expected)
        #expect(try Self.extents(image) == [
            Extent(offset: 0, length: 2 * c, kind: .data(hostOffset: 0x40000)),
            Extent(offset: 2 * c, length: 2 * c, kind: .zero),
            Extent(offset: 4 * c, length: c, kind: .compressed(hostOffset: 0x70010, length: Int(desc.byteLength))),
            Extent(offset: 5 * c, length: c, kind: .hole),
            Extent(offset: 6 * c, length: c, kind: .data(hostOffset: 0x90000)),
            Extent(offset: 7 * c, length: 9 * c, kind: .hole),
        ])
        // A request in the middle of a run: host offset of its first byte, length clipped.
        #expect(try image.blockStatus(at: 100, length: 1000) == Extent(offset: 100, length: 1000, kind: .data(hostOffset: 0x40064)))

        // With a backing file shorter than the image: unallocated ranges read from it up to
        // its end, zeros after; blockStatus says .backing then .hole.
        let backing = QCOW2FakeBacking(size: 5 * c + 1000, fill: 0x77)
        image.backing = backing
        var got = [UInt8](repeating: 0, count: Int(c))
        try got.withUnsafeMutableBytes { try image.read(into: $0, at: 5 * c) }
        #expect(got == [UInt8](repeating: 0x77, count: 1000) + [UInt8](repeating: 0, count: Int(c) - 1000))
        #expect(try image.blockStatus(at: 5 * c, length: c) == Extent(offset: 5 * c, length: 1000, kind: .backing))
        #expect(try image.blockStatus(at: 5 * c + 1000, length: c - 1000).kind == .hole)
        image.backing = nil
    }

    @Test func garbageCompressedClusterIsAnError() throws {
        let dir = NSTemporaryDirectory() + "qcow2-unit-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let desc = QCOW2CompressedDescriptor(hostOffset: 0x70000, additionalSectors: 2)
        let path = dir + "/g.qcow2"
        try Self.makeImage(at: path, l2: [0, QCOW2L2Entry.compressed(desc, clusterBits: 16).raw],
                           data: [(0x70000, [UInt8](repeating: 0xff, count: 1536))])
        let image = try QCOW2Image.open(path: path)
        defer { try? image.close() }
        var b = [UInt8](repeating: 0, count: 16)
        do {
            try b.withUnsafeMutableBytes { try image.read(into: $0, at: Self.c + 5) }
            Issue.record("garbage decompressed")
        } catch let e as ImageError {
            #expect(e.path == path)
            #expect(e.message.contains("guest offset \(Self.c)"))
        }
        // A stream that ends before a whole cluster is out is also refused.
        let short = try #require(try Self.compressed(.zlib, [UInt8](repeating: 3, count: 1000)))
        var out = [UInt8](repeating: 0, count: 4096)
        let ok = short.withUnsafeBytes { src in out.withUnsafeMutableBytes { QCOW2Compression.zlib.decompress(src, into: $0) } }
        #expect(!ok)
    }

    @Test func zstdRoundTrip() throws {
        let input = Self.pattern(3, 65536)
        let packed = try #require(try Self.compressed(.zstd, input))
        #expect(packed.count < 65536)
        var out = [UInt8](repeating: 0, count: 65536)
        // Extra bytes after the frame (the descriptor over-covers) are ignored.
        let padded = packed + [UInt8](repeating: 0x5a, count: 300)
        #expect(padded.withUnsafeBytes { src in out.withUnsafeMutableBytes { QCOW2Compression.zstd.decompress(src, into: $0) } })
        #expect(out == input)
        var random = SystemRandomNumberGenerator()
        let noise = (0..<4096).map { _ in UInt8.random(in: 0...255, using: &random) }
        #expect(try Self.compressed(.zstd, noise) == nil)
        #expect(try Self.compressed(.zlib, noise) == nil)
    }

    @Test func extendedL2Subclusters() throws {
        let dir = NSTemporaryDirectory() + "qcow2-unit-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let c = Self.c, sc = Self.c / 32
        let data = Self.pattern(4, Int(c))
        let path = dir + "/e.qcow2"
        try Self.makeImage(at: path, extendedL2: true, l2: [
            QCOW2L2Entry.standard(hostOffset: 0x40000, copied: true).raw, 0b0101 | (0b1000 << 32),
            0, 1,  // allocated subcluster without a host offset: corrupt
        ], data: [(0x40000, data)])
        let image = try QCOW2Image.open(path: path)
        defer { try? image.close() }
        var first = [UInt8](repeating: 0xcc, count: Int(c))
        try first.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        var expected = Array(data[0..<Int(sc)]) + [UInt8](repeating: 0, count: Int(sc))
        expected += Array(data[Int(2 * sc)..<Int(3 * sc)])
        expected += [UInt8](repeating: 0, count: Int(c - 3 * sc))
        #expect(first == expected)
        #expect(try image.blockStatus(at: 0, length: c) == Extent(offset: 0, length: sc, kind: .data(hostOffset: 0x40000)))
        #expect(try image.blockStatus(at: sc, length: c - sc) == Extent(offset: sc, length: sc, kind: .hole))
        #expect(try image.blockStatus(at: 2 * sc, length: c - 2 * sc) == Extent(offset: 2 * sc, length: sc, kind: .data(hostOffset: 0x40000 + 2 * sc)))
        #expect(try image.blockStatus(at: 3 * sc, length: c - 3 * sc) == Extent(offset: 3 * sc, length: sc, kind: .zero))
        #expect(try image.blockStatus(at: 4 * sc, length: 28 * sc) == Extent(offset: 4 * sc, length: 28 * sc, kind: .hole))
        do {
            var b = [UInt8](repeating: 0, count: 512)
            try b.withUnsafeMutableBytes { try image.read(into: $0, at: c) }
            Issue.record("corrupt extended entry was read")
        } catch let e as ImageError {
            #expect(e.message.contains("no host offset"))
        }
    }

    @Test func snapshotTable() throws {
        let dir = NSTemporaryDirectory() + "qcow2-unit-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var one = QCOW2Snapshot(l1TableOffset: 0x20000, l1Size: 1, id: "1", name: "first", dateSeconds: 1000,
                                dateNanoseconds: 5, vmClockNanoseconds: 3_000_000_007, vmStateSize: 9,
                                diskSize: 16 * Self.c, icount: nil,
                                extraData: [0, 0, 0, 0, 0, 0, 0, 9] + [0, 0, 0, 0, 0, 0x10, 0, 0] + [UInt8](repeating: 0xff, count: 8),
                                entrySize: 0)
        var two = one
        two.id = "2"; two.name = "second one"; two.extraData = [0, 0, 0, 0, 0, 0, 0, 0]; two.vmStateSize = 0
        let bytes = one.serialized() + two.serialized()
        let path = dir + "/s.qcow2"
        try Self.makeImage(at: path, l2: [], data: [], snapshotTable: (2, bytes))
        let image = try QCOW2Image.open(path: path)
        let snaps = image.snapshots
        #expect(snaps.map(\.name) == ["first", "second one"])
        #expect(snaps[0].vmStateSize == 9 && snaps[0].diskSize == 16 * Self.c && snaps[0].icount == nil)
        #expect(snaps[1].vmStateSize == 0 && snaps[1].diskSize == nil)
        #expect(snaps[0].entrySize == one.serialized().count)
        one.entrySize = snaps[0].entrySize
        #expect(snaps[0] == one)
        let info = try image.info().snapshots
        #expect(info[0].vmClockNanoseconds == 3_000_000_007 && info[0].dateSeconds == 1000)
        try image.close()

        // Broken tables: extra data too large, names running past the end of the file.
        var bad = one.serialized()
        bad[36] = 0; bad[37] = 0; bad[38] = 0x10; bad[39] = 0  // extra_data_size 4096
        try Self.makeImage(at: path, l2: [], data: [], snapshotTable: (1, bad))
        #expect(throws: ImageError.self) { _ = try QCOW2Image.open(path: path) }
        bad = one.serialized()
        bad[12] = 0xff; bad[13] = 0xff; bad[14] = 0xff; bad[15] = 0xff  // id and name past the end of the file
        try Self.makeImage(at: path, l2: [], data: [], snapshotTable: (1, bad))
        #expect(throws: ImageError.self) { _ = try QCOW2Image.open(path: path) }
        // More entries claimed than the file holds.
        try Self.makeImage(at: path, l2: [], data: [], snapshotTable: (5000, one.serialized()))
        #expect(throws: ImageError.self) { _ = try QCOW2Image.open(path: path) }
    }

    /// Random byte corruptions of the header, L1 and L2 tables: opening and reading must throw
    /// or succeed, never trap or hang.
    @Test func corruptedImagesNeverTrap() throws {
        let dir = NSTemporaryDirectory() + "qcow2-unit-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let c = Self.c
        let plain = Self.pattern(50, Int(c))
        let compressed = try #require(try Self.compressed(.zlib, plain))
        let desc = QCOW2CompressedDescriptor.covering(hostOffset: 0x70010, length: UInt64(compressed.count))
        let l2: [UInt64] = [
            QCOW2L2Entry.standard(hostOffset: 0x40000, copied: true).raw,
            QCOW2L2Entry.standard(hostOffset: 0, copied: false, zero: true).raw,
            QCOW2L2Entry.compressed(desc, clusterBits: 16).raw,
        ]
        let path = dir + "/f.qcow2"
        var state: UInt64 = 0x9e37_79b9_7f4a_7c15
        func next() -> UInt64 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return state >> 33
        }
        var outcomes = (opened: 0, refused: 0)
        for _ in 0..<300 {
            try Self.makeImage(at: path, l2: l2, data: [(0x40000, plain), (0x70010, compressed)], backing: "b.raw")
            let file = try DiskFile.open(path, access: .readWrite)
            for _ in 0..<(1 + next() % 4) {
                // Mostly the header's fields, sometimes the L1 entry or the L2 entries.
                let region = next() % 4
                let offset: UInt64 = region < 2 ? next() % 128 : region == 2 ? 0x20000 + next() % 8 : 0x30000 + next() % 24
                try file.write([UInt8(truncatingIfNeeded: next())], at: offset)
            }
            file.close()
            do {
                let image = try QCOW2Image.open(path: path)
                defer { try? image.close() }
                outcomes.opened += 1
                var buffer = [UInt8](repeating: 0, count: 3 * Int(c))
                let n = Int(min(UInt64(buffer.count), image.virtualSize))
                _ = try? buffer.withUnsafeMutableBytes { try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: 0) }
                if image.virtualSize > 0 {
                    _ = try? image.blockStatus(at: 0, length: min(image.virtualSize, 1 << 30))
                }
                _ = try? image.info()
            } catch is ImageError {
                outcomes.refused += 1
            } catch is IOError {
                outcomes.refused += 1
            }
        }
        #expect(outcomes.opened > 0 && outcomes.refused > 0)
    }

    @Test func tableCacheWritesBackDirtyTablesBeforeEvicting() throws {
        let dir = NSTemporaryDirectory() + "qcow2-unit-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = try DiskFile.create(dir + "/t")
        defer { file.close() }
        try file.truncate(to: 4 * 512)
        let cache = QCOW2TableCache(file: file, tableSize: 512, budgetBytes: 1024)
        #expect(cache.capacity == 2)
        var hookCalls = 0
        cache.beforeWriteback = { hookCalls += 1 }
        try cache.update(at: 0) { $0[0] = 0x1122_3344_5566_7788 }
        _ = try cache.table(at: 512)
        #expect(hookCalls == 0)
        #expect(try file.readBytes(count: 8, at: 0) == [UInt8](repeating: 0, count: 8))
        // Loading a third table evicts the least recently used one (the dirty table at 0).
        _ = try cache.table(at: 1024)
        #expect(hookCalls == 1)
        #expect(!cache.contains(0))
        #expect(try file.readBytes(count: 8, at: 0) == [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88])
        #expect(try cache.word(at: 0, index: 0) == 0x1122_3344_5566_7788)  // read back from the file
        // install + flush.
        var words = [UInt64](repeating: 0, count: 64)
        words[63] = 9
        try cache.install(at: 1536, words: words)
        #expect(cache.dirtyCount == 1)
        try cache.flush()
        #expect(hookCalls == 2)
        #expect(cache.dirtyCount == 0)
        #expect(try file.readBytes(count: 8, at: 1536 + 504) == [0, 0, 0, 0, 0, 0, 0, 9])
        try cache.flush()
        #expect(hookCalls == 2)  // nothing dirty: no hook

        // Least recently used goes first: with A, B cached and A touched, loading C evicts B.
        let lru = QCOW2TableCache(file: file, tableSize: 512, budgetBytes: 1024)
        _ = try lru.table(at: 0)
        _ = try lru.table(at: 512)
        _ = try lru.word(at: 0, index: 1)
        _ = try lru.table(at: 1024)
        #expect(lru.contains(0) && !lru.contains(512) && lru.contains(1024))
        lru.forget(1024)
        try lru.install(at: 1536, words: [UInt64](repeating: 1, count: 64), dirty: false)
        #expect(lru.contains(0) && lru.contains(1536) && lru.dirtyCount == 0)
        lru.dropClean()
        #expect(!lru.contains(0) && !lru.contains(1536))
    }
}

/// A backing image that reads as one byte value.
final class QCOW2FakeBacking: DiskImage {
    let size: UInt64
    let fill: UInt8
    init(size: UInt64, fill: UInt8) { self.size = size; self.fill = fill }
    var path: String { "fake" }
    var format: ImageFormat { .raw }
    var virtualSize: UInt64 { size }
    var isWritable: Bool { false }
    var backing: (any DiskImage)? { nil }
    var dataFile: DiskFile { fatalError("not used") }
    var file: DiskFile { dataFile }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        precondition(offset + UInt64(buffer.count) <= size, "read past the fake's end")
        buffer.initializeMemory(as: UInt8.self, repeating: fill)
    }
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {}
    func writeZeroes(at offset: UInt64, length: UInt64) throws {}
    func discard(at offset: UInt64, length: UInt64) throws {}
    func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent { Extent(offset: offset, length: length, kind: .data(hostOffset: nil)) }
    func flush() throws {}
    func close() throws {}
    func info() throws -> ImageInfo { ImageInfo(filename: path, format: "raw", virtualSize: size) }
}
