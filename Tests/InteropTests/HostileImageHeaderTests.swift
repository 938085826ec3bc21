import Foundation
import Testing

/// Every qcow2 header field set out of range, one case per value, through the built simg:
/// info, info --output=json, check and convert all exit 1 naming the file, within a second and
/// 200 MiB, with the same exit status as qemu-img wherever qemu-img refuses the image too.
@Suite struct HostileImageHeaderTests {
    typealias C = HostileCase
    typealias F = HostileField

    static let eofNote = "qemu-img reads a table past the end of the file as zeros; simg refuses it"

    static let fieldCases: [HostileCase] = [
        // magic (with -f qcow2: without it the probe rightly calls the file raw)
        HostileCase("magic-zero", format: "qcow2") { hostilePut32(&$0, F.magic, 0) },
        HostileCase("magic-qcow1-version", format: "qcow2") { hostilePut32(&$0, F.magic, 0x5146_49fa) },
        // version
        // Version 0 with -f qcow2: qemu-img's probe calls it raw, simg's calls it qcow2 (refused).
        HostileCase("version-0", format: "qcow2") { hostilePut32(&$0, F.version, 0) },
        .field32("version-1", F.version, 1),
        .field32("version-4", F.version, 4),
        .field32("version-max", F.version, .max),
        // backing_file_offset / backing_file_size
        HostileCase("backing-offset-past-cluster") {
            hostilePut64(&$0, F.backingFileOffset, 0x10008); hostilePut32(&$0, F.backingFileSize, 4)
        },
        HostileCase("backing-offset-max") {
            hostilePut64(&$0, F.backingFileOffset, .max); hostilePut32(&$0, F.backingFileSize, 4)
        },
        HostileCase("backing-name-runs-past-cluster") {
            hostilePut64(&$0, F.backingFileOffset, 0xfff0); hostilePut32(&$0, F.backingFileSize, 100)
        },
        HostileCase("backing-size-1024") {
            hostilePut64(&$0, F.backingFileOffset, 0x1000); hostilePut32(&$0, F.backingFileSize, 1024)
        },
        HostileCase("backing-size-max") {
            hostilePut64(&$0, F.backingFileOffset, 0x1000); hostilePut32(&$0, F.backingFileSize, .max)
        },
        HostileCase("backing-size-zero", qemu: .differs, note: "qemu-img takes an empty name as no backing file") {
            hostilePut64(&$0, F.backingFileOffset, 0x1000); hostilePut32(&$0, F.backingFileSize, 0)
        },
        HostileCase("backing-size-past-512-cluster", "512") {
            hostilePut64(&$0, F.backingFileOffset, 0x100); hostilePut32(&$0, F.backingFileSize, 0x101)
        },
        // cluster_bits
        .field32("cluster-bits-0", F.clusterBits, 0),
        .field32("cluster-bits-8", F.clusterBits, 8),
        .field32("cluster-bits-22", F.clusterBits, 22),
        .field32("cluster-bits-63", F.clusterBits, 63),
        .field32("cluster-bits-max", F.clusterBits, .max),
        // size
        .field64("size-max", F.size, .max),
        .field64("size-2^63", F.size, 1 << 63),
        .field64("size-past-l1", F.size, 1 << 40),
        .field64("size-past-l1-512", F.size, 1 << 30, "512"),
        // crypt_method
        .field32("crypt-aes", F.cryptMethod, 1, qemu: .differs,
                 note: "qemu-img info opens an AES image without its key; simg has no encryption"),
        .field32("crypt-luks", F.cryptMethod, 2, qemu: .differs,
                 note: "qemu-img 7.2 info dies of a signal on LUKS without its crypto header"),
        .field32("crypt-3", F.cryptMethod, 3),
        .field32("crypt-max", F.cryptMethod, .max),
        // l1_size
        .field32("l1-size-0", F.l1Size, 0),
        .field32("l1-size-max", F.l1Size, .max),
        .field32("l1-size-4Mi+1", F.l1Size, (4 << 20) + 1),
        .field32("l1-size-4Mi-past-eof", F.l1Size, 4 << 20, qemu: .differs, note: eofNote),
        // l1_table_offset
        .field64("l1-offset-0", F.l1TableOffset, 0, qemu: .differs, note: "the L1 table would overlay the header"),
        .field64("l1-offset-misaligned", F.l1TableOffset, 0x30200),
        .field64("l1-offset-misaligned-512", F.l1TableOffset, 0x208, "512"),
        .field64("l1-offset-past-eof", F.l1TableOffset, 0x100000, qemu: .differs, note: eofNote),
        .field64("l1-offset-overflow", F.l1TableOffset, 0xffff_ffff_ffff_0000),
        // refcount_table_offset / refcount_table_clusters
        .field64("refcount-offset-0", F.refcountTableOffset, 0, qemu: .differs,
                 note: "the refcount table would overlay the header"),
        .field64("refcount-offset-misaligned", F.refcountTableOffset, 0x10008),
        .field64("refcount-offset-past-eof", F.refcountTableOffset, 0x100_0000, qemu: .differs, note: eofNote),
        .field64("refcount-offset-overflow", F.refcountTableOffset, 0xffff_ffff_ffff_0000),
        .field32("refcount-clusters-0", F.refcountTableClusters, 0, qemu: .differs,
                 note: "qemu-img check opens it and reports corruptions (2); simg check refuses it (1)"),
        .field32("refcount-clusters-max", F.refcountTableClusters, .max),
        .field32("refcount-clusters-129", F.refcountTableClusters, 129),
        .field32("refcount-clusters-128-past-eof", F.refcountTableClusters, 128, qemu: .differs, note: eofNote),
        .field32("refcount-clusters-16385-512", F.refcountTableClusters, 16385, "512"),
        // nb_snapshots / snapshots_offset
        .field32("snapshots-65537", F.nbSnapshots, 65537),
        .field32("snapshots-max", F.nbSnapshots, .max),
        HostileCase("snapshots-65536-past-eof") {
            hostilePut32(&$0, F.nbSnapshots, 65536); hostilePut64(&$0, F.snapshotsOffset, 0x10000)
        },
        HostileCase("snapshot-offset-0", "64k", .refused(check: 2), qemu: .differs,
                    note: "the table would overlay the header") {
            hostilePut32(&$0, F.nbSnapshots, 1); hostilePut64(&$0, F.snapshotsOffset, 0)
        },
        .field64("snapshot-offset-misaligned-none", F.snapshotsOffset, 0x10008),
        HostileCase("snapshot-offset-past-eof", "64k", .refused(check: 2), qemu: .differs, note: eofNote) {
            hostilePut32(&$0, F.nbSnapshots, 1); hostilePut64(&$0, F.snapshotsOffset, 0x100_0000)
        },
        HostileCase("snapshot-offset-overflow") {
            hostilePut32(&$0, F.nbSnapshots, 1); hostilePut64(&$0, F.snapshotsOffset, 0xffff_ffff_ffff_0000)
        },
        // incompatible_features
        .field64("incompatible-bit-5", F.incompatible, 1 << 5),
        .field64("incompatible-bit-63", F.incompatible, 1 << 63),
        .field64("incompatible-all", F.incompatible, .max),
        .field64("incompatible-data-file-no-name", F.incompatible, 1 << 2, qemu: .differs,
                 note: "qemu-img info opens it without the data file"),
        .field64("incompatible-compression-type-zero", F.incompatible, 1 << 3),
        .field64("incompatible-extended-l2-512", F.incompatible, 1 << 4, "512"),
        // compatible_features: unknown bits are allowed by the spec
        .field64("compatible-all", F.compatible, .max, "64k", .accepted(check: 0)),
        // autoclear_features: unknown bits are allowed, but raw external data needs a data file
        .field64("autoclear-unknown", F.autoclear, .max & ~3, "64k", .accepted(check: 0)),
        .field64("autoclear-data-file-raw", F.autoclear, 2, qemu: .differs,
                 note: "qemu-img info opens it; check and convert refuse it as simg does"),
        // refcount_order
        .field32("refcount-order-7", F.refcountOrder, 7),
        .field32("refcount-order-max", F.refcountOrder, .max),
        // header_length
        .field32("header-length-0", F.headerLength, 0),
        .field32("header-length-103", F.headerLength, 103),
        .field32("header-length-105", F.headerLength, 105, qemu: .differs,
                 note: "the spec says a multiple of 8; qemu-img does not check it"),
        .field32("header-length-past-cluster", F.headerLength, 0x10008),
        .field32("header-length-past-512-cluster", F.headerLength, 0x208, "512"),
        .field32("header-length-max", F.headerLength, .max),
        // compression_type
        HostileCase("compression-type-2") {
            hostilePut64(&$0, F.incompatible, 1 << 3); hostilePut(&$0, F.compressionType, [2])
        },
        HostileCase("compression-type-255") {
            hostilePut64(&$0, F.incompatible, 1 << 3); hostilePut(&$0, F.compressionType, [255])
        },
        HostileCase("compression-type-without-bit") { hostilePut(&$0, F.compressionType, [1]) },
        // version 2 images: fields with v2 meaning
        .field32("v2-cluster-bits-30", F.clusterBits, 30, "4k-v2"),
        .field64("v2-l1-offset-misaligned", F.l1TableOffset, 0x3008, "4k-v2"),
        .field32("v2-l1-size-max", F.l1Size, .max, "4k-v2"),
    ]

    /// Header extensions: lengths that run out of the header area, bad known extensions.
    static let extensionCases: [HostileCase] = [
        HostileCase("extension-length-max") { hostilePut32(&$0, F.firstExtension + 4, .max) },
        HostileCase("extension-length-past-cluster") { hostilePut32(&$0, F.firstExtension + 4, 0x10000 - 120 + 1) },
        HostileCase("extension-length-past-512-cluster", "512") {
            // 512-byte clusters have no feature table: write an unknown extension.
            hostilePut32(&$0, F.firstExtension, 0x1234_5678); hostilePut32(&$0, F.firstExtension + 4, 512 - 120 + 1)
        },
        HostileCase("extension-overlaps-backing-name") {
            hostilePut64(&$0, F.backingFileOffset, 0x200); hostilePut32(&$0, F.backingFileSize, 4)
            hostilePut(&$0, 0x200, Array("base".utf8))
            hostilePut32(&$0, F.firstExtension, 0x1234_5678); hostilePut32(&$0, F.firstExtension + 4, 0x300)
        },
        HostileCase("bitmaps-extension-length-23") {
            hostilePut32(&$0, F.firstExtension, 0x2385_2875); hostilePut32(&$0, F.firstExtension + 4, 23)
        },
        HostileCase("bitmaps-directory-misaligned") {
            hostilePut64(&$0, F.autoclear, 1)
            hostilePut32(&$0, F.firstExtension, 0x2385_2875); hostilePut32(&$0, F.firstExtension + 4, 24)
            hostilePut(&$0, F.firstExtension + 8, bigEndian32(5) + bigEndian32(0) + bigEndian64(0x10000) + bigEndian64(0x123))
        },
        HostileCase("bitmaps-directory-too-large") {
            hostilePut64(&$0, F.autoclear, 1)
            hostilePut32(&$0, F.firstExtension, 0x2385_2875); hostilePut32(&$0, F.firstExtension + 4, 24)
            hostilePut(&$0, F.firstExtension + 8, bigEndian32(5) + bigEndian32(0) + bigEndian64(.max) + bigEndian64(0x10000))
        },
        HostileCase("bitmaps-count-too-large") {
            hostilePut64(&$0, F.autoclear, 1)
            hostilePut32(&$0, F.firstExtension, 0x2385_2875); hostilePut32(&$0, F.firstExtension + 4, 24)
            hostilePut(&$0, F.firstExtension + 8, bigEndian32(.max) + bigEndian32(0) + bigEndian64(0x10000) + bigEndian64(0x10000))
        },
        HostileCase("bitmaps-directory-past-eof", qemu: .differs,
                    note: "qemu-img opens it and fails only when reading the bitmap directory") {
            hostilePut64(&$0, F.autoclear, 1)
            hostilePut32(&$0, F.firstExtension, 0x2385_2875); hostilePut32(&$0, F.firstExtension + 4, 24)
            hostilePut(&$0, F.firstExtension + 8, bigEndian32(1) + bigEndian32(0) + bigEndian64(0x10000) + bigEndian64(0x100_0000))
        },
        // 8000 empty unknown extensions fill the first cluster: kept, and the image opens.
        HostileCase("extensions-8000-empty", "64k", .accepted(check: 0)) {
            var area: [UInt8] = []
            for i in 0..<8000 { area += bigEndian32(0x1000 + UInt32(i)) + bigEndian32(0) }
            hostilePut(&$0, F.firstExtension, area)
        },
        HostileCase("data-file-name-missing", qemu: .differs, note: "qemu-img info opens it without the data file") {
            hostilePut64(&$0, F.incompatible, 1 << 2)
            hostilePut32(&$0, F.firstExtension, 0x4441_5441); hostilePut32(&$0, F.firstExtension + 4, 8)
            hostilePut(&$0, F.firstExtension + 8, Array("/nothere".utf8))
        },
    ]

    @Test(arguments: fieldCases)
    func headerField(_ c: HostileCase) throws { try hostileVerify(c) }

    @Test(arguments: extensionCases)
    func headerExtension(_ c: HostileCase) throws { try hostileVerify(c) }
}
