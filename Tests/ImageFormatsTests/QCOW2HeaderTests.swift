import Testing
@testable import ImageFormats

/// Builds qcow2 header clusters field by field so each check can be broken on its own.
struct HeaderBuilder {
    var version: UInt32 = 3
    var clusterBits: UInt32 = 16
    var size: UInt64 = 1 << 20
    var cryptMethod: UInt32 = 0
    var l1Size: UInt32 = 1
    var l1Offset: UInt64 = 0x30000
    var refcountTableOffset: UInt64 = 0x10000
    var refcountTableClusters: UInt32 = 1
    var nbSnapshots: UInt32 = 0
    var snapshotsOffset: UInt64 = 0
    var incompatible: UInt64 = 0
    var compatible: UInt64 = 0
    var autoclear: UInt64 = 0
    var refcountOrder: UInt32 = 4
    var headerLength: UInt32 = 112
    var compressionType: UInt8 = 0
    var magic: UInt32 = 0x5146_49fb
    /// (type, data) extensions written after the header.
    var extensions: [(UInt32, [UInt8])] = []
    var backingName: String?
    var backingOffsetOverride: UInt64?
    var backingSizeOverride: UInt32?
    var fileSize: UInt64 = 0x50000

    func bytes() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 1 << Int(min(clusterBits, 16)))
        func p32(_ at: Int, _ v: UInt32) { for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
        func p64(_ at: Int, _ v: UInt64) { for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
        p32(0, magic); p32(4, version); p32(20, clusterBits); p64(24, size); p32(32, cryptMethod)
        p32(36, l1Size); p64(40, l1Offset); p64(48, refcountTableOffset); p32(56, refcountTableClusters)
        p32(60, nbSnapshots); p64(64, snapshotsOffset)
        var at = 72
        if version >= 3 {
            p64(72, incompatible); p64(80, compatible); p64(88, autoclear); p32(96, refcountOrder)
            p32(100, headerLength)
            b[104] = compressionType
            at = Int(headerLength)
        }
        for (type, data) in extensions {
            p32(at, type); p32(at + 4, UInt32(data.count))
            for (i, x) in data.enumerated() where at + 8 + i < b.count { b[at + 8 + i] = x }
            at += 8 + (data.count + 7) / 8 * 8
        }
        at += 8  // end marker (zeros)
        if let backingName {
            let name = Array(backingName.utf8)
            p64(8, backingOffsetOverride ?? UInt64(at))
            p32(16, backingSizeOverride ?? UInt32(name.count))
            for (i, x) in name.enumerated() where at + i < b.count { b[at + i] = x }
        }
        return b
    }

    func parse() throws -> QCOW2Header {
        try QCOW2Header.parse(bytes(), fileSize: fileSize, path: "test.qcow2")
    }
}

/// Expects parsing to fail with an ImageError whose message contains `field`.
func expectRefused(_ builder: HeaderBuilder, mentioning field: String,
                   sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        let h = try builder.parse()
        Issue.record("parsed a header that should be refused (\(field)): \(h)", sourceLocation: sourceLocation)
    } catch let error as ImageError {
        #expect(error.path == "test.qcow2", sourceLocation: sourceLocation)
        #expect(error.message.contains(field), "message '\(error.message)' does not mention \(field)",
                sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected error type \(error)", sourceLocation: sourceLocation)
    }
}

@Suite struct QCOW2HeaderTests {
    @Test func parsesV3() throws {
        var b = HeaderBuilder()
        b.extensions = [(0xe279_2aca, Array("qcow2".utf8))]
        b.backingName = "base.qcow2"
        b.compatible = 1
        let h = try b.parse()
        #expect(h.version == 3)
        #expect(h.clusterSize == 65536)
        #expect(h.size == 1 << 20)
        #expect(h.l1Size == 1 && h.l1TableOffset == 0x30000)
        #expect(h.refcountTableOffset == 0x10000 && h.refcountTableClusters == 1)
        #expect(h.refcountBits == 16)
        #expect(h.headerLength == 112)
        #expect(h.backingFormat == "qcow2")
        #expect(h.backingFileName == "base.qcow2")
        #expect(h.hasLazyRefcounts)
        #expect(h.l2Entries == 8192)
        #expect(h.compressionType == 0)
    }

    @Test func parsesV2WithImpliedFields() throws {
        var b = HeaderBuilder()
        b.version = 2
        let h = try b.parse()
        #expect(h.version == 2)
        #expect(h.refcountOrder == 4)
        #expect(h.headerLength == 72)
        #expect(h.incompatibleFeatures == 0 && h.compatibleFeatures == 0 && h.autoclearFeatures == 0)
        // v2 serialization is the 72-byte header and an end marker.
        #expect(h.serialized().count == 80)
        #expect(Array(h.serialized()[0..<72]) == Array(b.bytes()[0..<72]))
    }

    @Test func extendedL2Geometry() throws {
        var b = HeaderBuilder()
        b.incompatible = 1 << 4
        let h = try b.parse()
        #expect(h.hasExtendedL2)
        #expect(h.l2Entries == 4096)
        #expect(h.subclusterSize == 2048)
        #expect(h.bytesPerL2Table == 4096 * 65536)
    }

    @Test func refusesBrokenFields() {
        var b = HeaderBuilder(); b.magic = 0x1234_5678
        expectRefused(b, mentioning: "Image is not in qcow2 format")
        b = HeaderBuilder(); b.version = 1
        expectRefused(b, mentioning: "version")
        b = HeaderBuilder(); b.version = 4
        expectRefused(b, mentioning: "version")
        b = HeaderBuilder(); b.clusterBits = 8
        expectRefused(b, mentioning: "cluster_bits")
        b = HeaderBuilder(); b.clusterBits = 22
        expectRefused(b, mentioning: "cluster_bits")
        b = HeaderBuilder(); b.headerLength = 96
        expectRefused(b, mentioning: "header_length")
        b = HeaderBuilder(); b.headerLength = 108
        expectRefused(b, mentioning: "header_length")
        b = HeaderBuilder(); b.incompatible = 1 << 9
        expectRefused(b, mentioning: "incompatible_features")
        b = HeaderBuilder(); b.cryptMethod = 1
        expectRefused(b, mentioning: "encrypted images are not supported")
        b = HeaderBuilder(); b.cryptMethod = 2
        expectRefused(b, mentioning: "crypt_method")
        b = HeaderBuilder(); b.refcountOrder = 7
        expectRefused(b, mentioning: "refcount_order")
        b = HeaderBuilder(); b.l1Size = 4 << 20 + 1
        expectRefused(b, mentioning: "l1_size")
        b = HeaderBuilder(); b.l1Size = 0
        expectRefused(b, mentioning: "l1_size")
        b = HeaderBuilder(); b.l1Offset = 0x30200
        expectRefused(b, mentioning: "l1_table_offset")
        b = HeaderBuilder(); b.l1Offset = 0x60000
        expectRefused(b, mentioning: "l1_table_offset")
        b = HeaderBuilder(); b.refcountTableClusters = 129
        expectRefused(b, mentioning: "refcount_table_clusters")
        b = HeaderBuilder(); b.refcountTableOffset = 0x10008
        expectRefused(b, mentioning: "refcount_table_offset")
        b = HeaderBuilder(); b.refcountTableOffset = 0x50000
        expectRefused(b, mentioning: "refcount_table_offset")
        b = HeaderBuilder(); b.nbSnapshots = 65537; b.snapshotsOffset = 0x40000
        expectRefused(b, mentioning: "nb_snapshots")
        b = HeaderBuilder(); b.nbSnapshots = 1; b.snapshotsOffset = 0x40001
        expectRefused(b, mentioning: "snapshots_offset")
        b = HeaderBuilder(); b.nbSnapshots = 1; b.snapshotsOffset = 0x90000
        expectRefused(b, mentioning: "snapshots_offset")
        b = HeaderBuilder(); b.size = 1 << 40  // needs 128 L1 entries
        expectRefused(b, mentioning: "l1_size")
        b = HeaderBuilder(); b.compressionType = 1
        expectRefused(b, mentioning: "compression_type")
        b = HeaderBuilder(); b.incompatible = 1 << 3
        expectRefused(b, mentioning: "compression_type")
        b = HeaderBuilder(); b.incompatible = 1 << 3; b.compressionType = 2
        expectRefused(b, mentioning: "compression_type")
    }

    @Test func refusesBackingNamePastCluster() {
        var b = HeaderBuilder()
        b.backingName = "base.qcow2"
        b.backingOffsetOverride = 65530
        expectRefused(b, mentioning: "backing_file_offset")
        b = HeaderBuilder()
        b.backingName = "base.qcow2"
        b.backingSizeOverride = 1024
        expectRefused(b, mentioning: "backing_file_size")
        b = HeaderBuilder()
        b.backingName = "base"
        b.backingOffsetOverride = 0x20000
        expectRefused(b, mentioning: "backing_file_offset")
    }

    @Test func refusesOverflowingExtension() throws {
        var b = HeaderBuilder()
        b.extensions = [(0x1234_5678, [1, 2, 3])]
        let ok = try b.parse()
        #expect(ok.unknownExtensions == [QCOW2HeaderExtension(type: 0x1234_5678, data: [1, 2, 3])])
        var bytes = b.bytes()
        // Claim 1 MiB of extension data in a 64 KiB cluster.
        bytes[116] = 0x00; bytes[117] = 0x10; bytes[118] = 0; bytes[119] = 0
        #expect(throws: ImageError.self) { try QCOW2Header.parse(bytes, fileSize: 0x50000, path: "x") }
        do {
            _ = try QCOW2Header.parse(bytes, fileSize: 0x50000, path: "x")
        } catch let e as ImageError {
            #expect(e.message.contains("extension"))
        }
    }

    @Test func namesUnknownFeatureFromTable() {
        var b = HeaderBuilder()
        var entry = [UInt8](repeating: 0, count: 48)
        entry[0] = 0; entry[1] = 7
        for (i, c) in "future thing".utf8.enumerated() { entry[2 + i] = c }
        b.extensions = [(0x6803_f857, entry)]
        b.incompatible = 1 << 7
        expectRefused(b, mentioning: "future thing")
    }

    @Test func messagesStartWithQemusWords() throws {
        var b = HeaderBuilder(); b.version = 5
        #expect(throws: ImageError.self) { try b.parse() }
        do { _ = try b.parse() } catch let e as ImageError { #expect(e.message.hasPrefix("Unsupported qcow2 version 5")) }
        b = HeaderBuilder(); b.incompatible = 1 << 40 | 1 << 41
        do { _ = try b.parse() } catch let e as ImageError {
            #expect(e.message.hasPrefix("Unsupported qcow2 feature(s): Unknown incompatible feature: 30000000000"))
        }
        b = HeaderBuilder(); b.refcountOrder = 9
        do { _ = try b.parse() } catch let e as ImageError {
            #expect(e.message.hasPrefix("Reference count entry width too large; may not exceed 64 bits"))
        }
        b = HeaderBuilder(); b.l1Offset = 0x30008
        do { _ = try b.parse() } catch let e as ImageError { #expect(e.message.hasPrefix("Active L1 table offset invalid")) }
    }

    @Test func refusesTruncatedBuffer() {
        #expect(throws: ImageError.self) { try QCOW2Header.parse([0x51, 0x46, 0x49, 0xfb], fileSize: 4, path: "x") }
    }

    @Test func serializationLayout() throws {
        var b = HeaderBuilder()
        b.extensions = [(0xe279_2aca, Array("raw".utf8)), (0xabcd_0001, [9, 9, 9, 9, 9, 9, 9, 9, 9])]
        b.backingName = "base.raw"
        let h = try b.parse()
        let s = h.serialized()
        // Fixed fields, then backing format, feature table (64k clusters), the unknown extension,
        // end marker and the name right after it.
        #expect(QCOW2BE.u32(s, 100) == 112)
        #expect(QCOW2BE.u32(s, 112) == 0xe279_2aca && QCOW2BE.u32(s, 116) == 3)
        #expect(QCOW2BE.u32(s, 128) == 0x6803_f857 && QCOW2BE.u32(s, 132) == 384)
        let unknownAt = 128 + 8 + 384
        #expect(QCOW2BE.u32(s, unknownAt) == 0xabcd_0001 && QCOW2BE.u32(s, unknownAt + 4) == 9)
        let endAt = unknownAt + 8 + 16
        #expect(QCOW2BE.u64(s, endAt) == 0)
        #expect(QCOW2BE.u64(s, 8) == UInt64(endAt + 8))
        #expect(QCOW2BE.u32(s, 16) == 8)
        #expect(Array(s[(endAt + 8)...]) == Array("base.raw".utf8))
        // Reparsing gives the same header (apart from the table, which is now QEMU's).
        var again = try QCOW2Header.parse(s + [UInt8](repeating: 0, count: 65536 - s.count), fileSize: 0x50000, path: "x")
        #expect(again.featureNameTable == QCOW2Header.qemuFeatureTable)
        again.featureNameTable = h.featureNameTable
        #expect(again.backingFileOffset == UInt64(endAt + 8))
        again.backingFileOffset = h.backingFileOffset
        #expect(again == h)
    }

    @Test func unknownHeaderFieldsArePreserved() throws {
        var b = HeaderBuilder()
        b.headerLength = 128
        var bytes = b.bytes()
        for i in 112..<128 { bytes[i] = UInt8(i) }
        let h = try QCOW2Header.parse(bytes, fileSize: b.fileSize, path: "x")
        #expect(h.unknownHeaderFields == (112..<128).map { UInt8($0) })
        let s = h.serialized()
        #expect(QCOW2BE.u32(s, 100) == 128)
        #expect(Array(s[112..<128]) == h.unknownHeaderFields)
        // Extensions start after the longer header.
        #expect(QCOW2BE.u32(s, 128) == QCOW2Header.extensionFeatureTable)
        // A 104-byte header (no compression_type) is accepted and written back as QEMU's 112.
        b = HeaderBuilder()
        b.headerLength = 104
        let short = try b.parse()
        #expect(short.compressionType == 0 && short.unknownHeaderFields.isEmpty)
        #expect(QCOW2BE.u32(short.serialized(), 100) == 112)
    }

    @Test func smallClustersHaveNoFeatureTable() throws {
        var b = HeaderBuilder()
        b.clusterBits = 12
        b.l1Size = 64; b.l1Offset = 0x3000; b.refcountTableOffset = 0x1000
        b.fileSize = 0x5000
        let h = try b.parse()
        #expect(h.serialized().count == 120)
    }
}
