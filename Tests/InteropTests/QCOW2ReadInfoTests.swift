import Foundation
import Testing
@testable import ImageFormats
import DiskIO
import TestSupport

/// info() against `qemu-img info`, header serialization against qemu's bytes, and refusal of
/// broken images and backing chains.
@Suite struct QCOW2ReadInfoTests {
    /// Compares every field info() fills with qemu-img info --output=json.
    func expectInfoMatchesQemu(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let q = try jsonObject(try qemuImg("info", "--output=json", path).stdout)
        let image = try ImageOpener.open(path, options: OpenOptions(openBacking: false))
        defer { try? image.close() }
        let i = try image.info()
        func num(_ v: Any?) -> UInt64? { (v as? NSNumber)?.uint64Value }
        #expect(i.filename == q["filename"] as? String, sourceLocation: sourceLocation)
        #expect(i.format == q["format"] as? String, sourceLocation: sourceLocation)
        #expect(i.virtualSize == num(q["virtual-size"]), sourceLocation: sourceLocation)
        #expect(i.actualSize == num(q["actual-size"]), sourceLocation: sourceLocation)
        #expect(i.clusterSize.map(UInt64.init) == num(q["cluster-size"]), sourceLocation: sourceLocation)
        #expect(i.dirtyFlag == q["dirty-flag"] as? Bool, sourceLocation: sourceLocation)
        #expect(i.encrypted == q["encrypted"] as? Bool, sourceLocation: sourceLocation)
        #expect(i.backingFilename == q["backing-filename"] as? String, sourceLocation: sourceLocation)
        #expect(i.fullBackingFilename == q["full-backing-filename"] as? String, sourceLocation: sourceLocation)
        #expect(i.backingFilenameFormat == q["backing-filename-format"] as? String, sourceLocation: sourceLocation)
        let qs = (q["snapshots"] as? [[String: Any]]) ?? []
        #expect(i.snapshots.count == qs.count, sourceLocation: sourceLocation)
        for (a, b) in zip(i.snapshots, qs) {
            #expect(a.id == b["id"] as? String && a.name == b["name"] as? String, sourceLocation: sourceLocation)
            #expect(a.vmStateSize == num(b["vm-state-size"]), sourceLocation: sourceLocation)
            #expect(a.dateSeconds == num(b["date-sec"]) && a.dateNanoseconds == num(b["date-nsec"]), sourceLocation: sourceLocation)
            let clock = (num(b["vm-clock-sec"]) ?? 0) * 1_000_000_000 + (num(b["vm-clock-nsec"]) ?? 0)
            #expect(a.vmClockNanoseconds == clock, sourceLocation: sourceLocation)
            #expect(a.icount == num(b["icount"]), sourceLocation: sourceLocation)
        }
        let fs = (q["format-specific"] as? [String: Any])?["data"] as? [String: Any] ?? [:]
        let specific = try #require(i.formatSpecific, sourceLocation: sourceLocation)
        #expect(specific.type == "qcow2", sourceLocation: sourceLocation)
        let s = specific.data
        #expect(s["compat"]?.stringValue == fs["compat"] as? String, sourceLocation: sourceLocation)
        #expect(s["compression-type"]?.stringValue == fs["compression-type"] as? String, sourceLocation: sourceLocation)
        #expect(s["lazy-refcounts"]?.boolValue == fs["lazy-refcounts"] as? Bool, sourceLocation: sourceLocation)
        #expect((s["refcount-bits"]?.intValue).map(UInt64.init) == num(fs["refcount-bits"]), sourceLocation: sourceLocation)
        #expect(s["corrupt"]?.boolValue == fs["corrupt"] as? Bool, sourceLocation: sourceLocation)
        #expect(s["extended-l2"]?.boolValue == fs["extended-l2"] as? Bool, sourceLocation: sourceLocation)
        #expect(s["data-file"]?.stringValue == fs["data-file"] as? String, sourceLocation: sourceLocation)
        #expect(s["data-file-raw"]?.boolValue == fs["data-file-raw"] as? Bool, sourceLocation: sourceLocation)
        let qb = (fs["bitmaps"] as? [[String: Any]]) ?? []
        let bitmaps = (s["bitmaps"]?.listValue ?? []).compactMap(\.objectValue)
        #expect(bitmaps.count == qb.count, sourceLocation: sourceLocation)
        for (a, b) in zip(bitmaps, qb) {
            #expect(a["name"]?.stringValue == b["name"] as? String, sourceLocation: sourceLocation)
            #expect((a["granularity"]?.intValue).map(UInt64.init) == num(b["granularity"]), sourceLocation: sourceLocation)
            let flags = (a["flags"]?.listValue ?? []).compactMap(\.stringValue)
            #expect(flags == (b["flags"] as? [String] ?? []), sourceLocation: sourceLocation)
        }
    }

    @Test func infoMatchesQemu() throws {
        let dir = try TempDir()
        try FileManager.default.createDirectory(atPath: dir.file("sub"), withIntermediateDirectories: true)
        let base = dir.file("base.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "2M")
        try qemuIO("-c", "write -P 1 0 300k", base)
        try expectInfoMatchesQemu(base)
        let v2 = dir.file("v2.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", v2, "1M")
        try expectInfoMatchesQemu(v2)
        let top = dir.file("sub/top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=4,cluster_size=512",
                    "-b", "../base.qcow2", "-F", "qcow2", top)
        try expectInfoMatchesQemu(top)
        let abs = dir.file("abs.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd", "-b", base, "-F", "qcow2", abs)
        try expectInfoMatchesQemu(abs)
        let ext = dir.file("ext.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "data_file=\(dir.file("ext.data")),data_file_raw=on", ext, "1M")
        try qemuIO("-c", "write -P 3 0 64k", ext)
        try expectInfoMatchesQemu(ext)
        let snap = dir.file("snap.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", snap, "1M")
        try qemuIO("-c", "write -P 1 0 64k", snap)
        try qemuImg("snapshot", "-c", "one", snap)
        try qemuImg("snapshot", "-c", "two", snap)
        try expectInfoMatchesQemu(snap)
        // Relative image path: full-backing-filename keeps it relative, as qemu prints it.
        try expectInfoMatchesQemu(relativeFromCurrentDirectory(top))
    }

    @Test func dirtyImageAfterCrash() throws {
        let dir = try TempDir()
        let img = dir.file("dirty.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "1M")
        // qemu-io killed mid-session leaves the dirty bit set (lazy refcounts).
        let r = try run("qemu-io", ["-c", "write -P 1 0 64k", "-c", "write -P 2 200k 4k", "-c", "sigraise 9", img])
        #expect(r.status != 0)
        try expectInfoMatchesQemu(img)
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        #expect(try image.info().dirtyFlag == true)
        try expectSameContentAsQemu(img, in: dir)
    }

    @Test func sizeNotMultipleOfSector() throws {
        let dir = try TempDir()
        let img = dir.file("odd.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        try qemuIO("-c", "write -P 1 1016k 8k", img)
        try patchFile(img, at: 24, bigEndian64(1_048_336))
        try expectInfoMatchesQemu(img)
        #expect(try ImageOpener.open(img).virtualSize == 1_048_064)
        try expectSameContentAsQemu(img, in: dir)
    }

    @Test func bitmapsInInfo() throws {
        let dir = try TempDir()
        let img = dir.file("bm.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        try qemuImg("bitmap", "--add", "-g", "128k", img, "bm0")
        try qemuImg("bitmap", "--add", "--disable", img, "other")
        try expectInfoMatchesQemu(img)
        let bitmaps = try ImageOpener.open(img).info().formatSpecific?.data["bitmaps"]?.listValue
        #expect(bitmaps?.map { $0.objectValue?["name"]?.stringValue } == ["bm0", "other"])
    }

    @Test func serializedHeaderMatchesQemuBytes() throws {
        let dir = try TempDir()
        let cases: [(String, [String])] = [
            ("plain", ["-o", "cluster_size=64k"]),
            ("v2", ["-o", "compat=0.10"]),
            ("small", ["-o", "cluster_size=4k"]),
            ("tiny-backing", ["-o", "cluster_size=512", "-b", "plain.qcow2", "-F", "qcow2"]),
            ("backing", ["-b", "plain.qcow2", "-F", "qcow2"]),
            ("v2-backing", ["-o", "compat=0.10", "-b", "v2.qcow2", "-F", "qcow2"]),
            ("data", ["-o", "data_file=\(dir.file("d.raw")),data_file_raw=on"]),
            ("zstd-ext", ["-o", "compression_type=zstd,extended_l2=on,lazy_refcounts=on,refcount_bits=64"]),
        ]
        for (name, options) in cases {
            let img = dir.file("\(name).qcow2")
            try runOK("qemu-img", ["create", "-q", "-f", "qcow2"] + options + [img, "1M"])
            let image = try QCOW2Image.open(path: img)
            defer { try? image.close() }
            let cluster = try [UInt8](Data(contentsOf: URL(fileURLWithPath: img)).prefix(image.clusterSize))
            let ours = image.qcow2Header.serialized()
            #expect(ours.count <= cluster.count, "\(name)")
            let padded = ours + [UInt8](repeating: 0, count: max(0, cluster.count - ours.count))
            #expect(padded == cluster, "serialized header of \(name) differs from qemu-img's")
        }
        // A bitmaps extension and an unknown one written back in qemu's place.
        let bm = dir.file("bm.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", bm, "1M")
        try qemuImg("bitmap", "--add", bm, "b")
        var header = try QCOW2Image.open(path: bm).qcow2Header
        #expect(header.bitmapsExtension != nil)
        header.unknownExtensions.append(QCOW2HeaderExtension(type: 0x1234_5678, data: [1, 2, 3]))
        try patchFile(bm, at: 0, header.serialized())
        try qemuImg("check", bm)
        let again = try QCOW2Image.open(path: bm).qcow2Header
        #expect(again.unknownExtensions == header.unknownExtensions)
        #expect(again.bitmapsExtension == header.bitmapsExtension)
        try qemuImg("info", bm)
    }

    /// A qemu-made image with data, a compressed copy, and where their tables are.
    struct Victim {
        let path: String
        let l1Offset: UInt64
        let l2Offset: UInt64
    }

    func makeVictim(_ dir: TempDir, name: String, options: [String] = []) throws -> Victim {
        let img = dir.file(name)
        try runOK("qemu-img", ["create", "-q", "-f", "qcow2"] + options + [img, "1M"])
        try qemuIO("-c", "write -P 1 0 128k", img)
        let l1 = try readBigEndian64(img, at: 40)
        let l2 = try readBigEndian64(img, at: l1) & 0x00ff_ffff_ffff_fe00
        return Victim(path: img, l1Offset: l1, l2Offset: l2)
    }

    @Test func malformedHeadersAreRefused() throws {
        let dir = try TempDir()
        let patches: [(String, UInt64, [UInt8], String)] = [
            ("magic", 0, [0, 0, 0, 0], "qcow2 format"),
            ("version", 4, bigEndian32(5), "version"),
            ("cluster_bits", 20, bigEndian32(30), "cluster_bits"),
            ("size", 24, bigEndian64(1 << 50), "l1_size"),
            ("crypt", 32, bigEndian32(2), "encrypted images are not supported"),
            ("l1 offset", 40, bigEndian64(0x30001), "l1_table_offset"),
            ("l1 beyond eof", 40, bigEndian64(0x7fff_0000), "l1_table_offset"),
            ("refcount offset", 48, bigEndian64(0x7fff_0000), "refcount_table_offset"),
            ("refcount clusters", 56, bigEndian32(1000), "refcount_table_clusters"),
            ("snapshots", 60, bigEndian32(100_000), "nb_snapshots"),
            ("incompatible", 72, bigEndian64(1 << 40), "incompatible_features"),
            ("refcount order", 96, bigEndian32(9), "refcount_order"),
            ("header length", 100, bigEndian32(50), "header_length"),
            ("extension length", 116, bigEndian32(0x00ff_0000), "extension"),
        ]
        for (name, offset, bytes, expected) in patches {
            let v = try makeVictim(dir, name: "\(name).qcow2")
            try patchFile(v.path, at: offset, bytes)
            // With a broken magic the probe would call it raw: say it is qcow2.
            let text = expectImageError(name) { _ = try ImageOpener.open(v.path, options: OpenOptions(format: .qcow2)) }
            #expect(text.contains(expected), "\(name): '\(text)'")
            #expect(text.contains(v.path), "\(name): '\(text)'")
        }
    }

    @Test func corruptTablesGiveErrors() throws {
        let dir = try TempDir()
        var v = try makeVictim(dir, name: "l1.qcow2")
        try patchFile(v.path, at: v.l1Offset, bigEndian64(0x8000_0000_0003_0200))
        expectImageError("misaligned L2 table") { try expectSameContentAsQemu(v.path, in: dir) }

        v = try makeVictim(dir, name: "l2.qcow2")
        try patchFile(v.path, at: v.l2Offset, bigEndian64(0x8000_0000_0005_0200))
        expectImageError("misaligned data cluster") { try expectSameContentAsQemu(v.path, in: dir) }

        v = try makeVictim(dir, name: "v2zero.qcow2", options: ["-o", "compat=0.10"])
        try patchFile(v.path, at: v.l2Offset, bigEndian64(1))
        expectImageError("zero flag in v2") { try expectSameContentAsQemu(v.path, in: dir) }

        // Extended L2: allocation bits without a host offset.
        v = try makeVictim(dir, name: "ext.qcow2", options: ["-o", "extended_l2=on"])
        try patchFile(v.path, at: v.l2Offset + 16, bigEndian64(0) + bigEndian64(1))
        let image = try ImageOpener.open(v.path)
        defer { try? image.close() }
        var b = [UInt8](repeating: 0, count: 512)
        let text = expectImageError("alloc bit without offset") {
            try b.withUnsafeMutableBytes { try image.read(into: $0, at: 64 << 10) }
        }
        #expect(text.contains("no host offset"))
    }

    @Test(arguments: ["zlib", "zstd"])
    func garbageCompressedDataGivesError(type: String) throws {
        let dir = try TempDir()
        let raw = dir.file("src.raw")
        try qemuImg("create", "-q", "-f", "raw", raw, "1M")
        try qemuIO("-f", "raw", "-c", "write -P 0x21 0 1M", raw)
        let img = dir.file("c.qcow2")
        try qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", raw, img)
        let host: UInt64
        do {
            let image = try QCOW2Image.open(path: img)
            defer { try? image.close() }
            guard case .compressed(let d) = try image.lookup(at: 128 << 10, maxLength: 1).kind else {
                Issue.record("cluster not compressed")
                return
            }
            host = d.hostOffset
        }
        try patchFile(img, at: host, [UInt8](repeating: 0xff, count: 32))
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        var b = [UInt8](repeating: 0, count: 4096)
        try b.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }  // other clusters still fine
        let text = expectImageError("garbage \(type) stream") {
            try b.withUnsafeMutableBytes { try image.read(into: $0, at: (128 << 10) + 100) }
        }
        #expect(text.contains(img) && text.contains("\(128 << 10)"), "'\(text)'")
    }

    @Test func backingLoopIsRefused() throws {
        let dir = try TempDir()
        let a = dir.file("a.qcow2"), b = dir.file("b.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", a, "1M")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
        try qemuImg("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
        let text = expectImageError("A -> B -> A") { _ = try ImageOpener.open(b) }
        #expect(text.contains("loops back"), "'\(text)'")
        // An image naming itself (made with our serializer: qemu-img refuses to create it).
        let c = dir.file("c.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", c, "1M")
        var header = try QCOW2Image.open(path: c).qcow2Header
        header.backingFileName = "./c.qcow2"
        header.backingFormat = "qcow2"
        try patchFile(c, at: 0, header.serialized())
        let selfText = expectImageError("self loop") { _ = try ImageOpener.open(c) }
        #expect(selfText.contains("loops back"), "'\(selfText)'")
        // Without opening backing files, both open fine.
        try ImageOpener.open(c, options: OpenOptions(openBacking: false)).close()
    }

    @Test func missingBackingFileIsNamed() throws {
        let dir = try TempDir()
        let img = dir.file("m.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2", img, "1M")
        let text = expectImageError("missing backing") { _ = try ImageOpener.open(img) }
        #expect(text.contains("Could not open backing file '\(dir.file("nothere.qcow2"))' of '\(img)'"), "'\(text)'")
        #expect(text.contains("No such file or directory"), "'\(text)'")

        // One level of "Could not open backing file" per image above the failure, as qemu nests them.
        let mid = dir.file("mid.qcow2"), top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", mid, "1M")
        try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "mid.qcow2", "-F", "qcow2", top, "1M")
        do {
            _ = try ImageOpener.open(top)
            Issue.record("opened a chain with a missing file")
        } catch let outer as ImageError {
            #expect(outer.path == top)
            #expect(outer.message == "Could not open backing file '\(mid)' of '\(top)'")
            let inner = try #require(outer.cause as? ImageError)
            #expect(inner.path == mid)
            #expect(inner.message == "Could not open backing file '\(dir.file("gone.qcow2"))' of '\(mid)'")
            let io = try #require(inner.cause as? IOError)
            #expect(io.path == dir.file("gone.qcow2") && io.code == ENOENT)
        }
    }

    @Test func unsupportedBackingFormatIsNamed() throws {
        let dir = try TempDir()
        let img = dir.file("v.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "disk.vmdk", "-F", "vmdk", img, "1M")
        let text = expectImageError("vmdk backing") { _ = try ImageOpener.open(img) }
        #expect(text.contains("vmdk") && text.contains(img), "'\(text)'")
    }

    @Test func encryptedImageIsRefusedClearly() throws {
        let dir = try TempDir()
        let img = dir.file("enc.qcow2")
        // Legacy AES (crypt_method 1): qemu-img makes it without the key-derivation benchmark
        // LUKS runs, which fails on a loaded machine. LUKS (2) is covered by the header patches.
        try qemuImg("create", "-q", "--object", "secret,id=sec0,data=abc", "-f", "qcow2",
                    "-o", "encrypt.format=aes,encrypt.key-secret=sec0", img, "1M")
        let text = expectImageError("AES image") { _ = try ImageOpener.open(img) }
        #expect(text.contains("encrypted images are not supported") && text.contains(img), "'\(text)'")
    }

    @Test func rawOpenedAsQcow2IsRefused() throws {
        let dir = try TempDir()
        let raw = dir.file("r.raw")
        try qemuImg("create", "-q", "-f", "raw", raw, "1M")
        let text = expectImageError("raw as qcow2") { _ = try ImageOpener.open(raw, options: OpenOptions(format: .qcow2)) }
        #expect(text.contains("not in qcow2 format"))
        let probed = try ImageOpener.open(raw)
        #expect(probed.format == .raw)
        try probed.close()
    }
}
