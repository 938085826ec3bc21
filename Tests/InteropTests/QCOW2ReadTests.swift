import Foundation
import Testing
@testable import ImageFormats
import TestSupport

/// Reads qemu-made qcow2 images through the library and compares them with qemu-img.
@Suite struct QCOW2ReadTests {
    /// Some data, zeroes and discards at cluster-crossing offsets.
    static func scribble(_ path: String, v3: Bool, size: UInt64) throws {
        var commands = ["-c", "write -P 0xaa 0 100k", "-c", "write -P 0x55 1000k 3k",
                        "-c", "write -P 0x11 \(size - 70 * 1024) 70k"]
        if v3 { commands += ["-c", "write -z 1536k 256k", "-c", "write -P 0x66 1600k 1k"] }
        commands += ["-c", "discard 64k 4k"]
        try runOK("qemu-io", commands + [path])
    }

    @Test(arguments: [("0.10", 512), ("0.10", 4096), ("0.10", 65536), ("0.10", 2 << 20),
                      ("1.1", 512), ("1.1", 4096), ("1.1", 65536), ("1.1", 2 << 20)])
    func versionsAndClusterSizes(compat: String, clusterSize: Int) throws {
        let dir = try TempDir()
        let img = dir.file("a.qcow2")
        let size: UInt64 = clusterSize == 2 << 20 ? 8 << 20 : 3 << 20
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=\(compat),cluster_size=\(clusterSize)", img, "\(size)")
        try Self.scribble(img, v3: compat == "1.1", size: size)
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
    }

    @Test(arguments: [1, 2, 4, 8, 16, 32, 64])
    func refcountWidths(bits: Int) throws {
        let dir = try TempDir()
        let img = dir.file("r.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=\(bits)", img, "2M")
        try Self.scribble(img, v3: true, size: 2 << 20)
        try expectSameContentAsQemu(img, in: dir)
        let info = try ImageOpener.open(img).info()
        #expect(info.formatSpecific?.data["refcount-bits"]?.intValue == Int64(bits))
    }

    @Test func zeroClustersPlainAndAllocated() throws {
        let dir = try TempDir()
        let img = dir.file("z.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", img, "4M")
        try qemuIO("-c", "write -P 1 0 1M", "-c", "write -z 128k 128k", "-c", "write -z -u 512k 64k",
                   "-c", "write -z 2M 64k", img)
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        #expect(try image.blockStatus(at: 128 << 10, length: 1 << 20).kind == .zero)
        #expect(try image.blockStatus(at: 2 << 20, length: 64 << 10) == Extent(offset: 2 << 20, length: 64 << 10, kind: .zero))
        #expect(try image.blockStatus(at: 3 << 20, length: 1 << 20).kind == .hole)
    }

    @Test(arguments: ["zlib", "zstd"])
    func compressed(type: String) throws {
        let dir = try TempDir()
        let raw = dir.file("src.raw")
        try qemuImg("create", "-q", "-f", "raw", raw, "3M")
        try qemuIO("-f", "raw", "-c", "write -P 0x21 0 1M", "-c", "write -P 0x42 1100k 5k", raw)
        // Incompressible clusters stay uncompressed in qemu's output: a mix of both kinds.
        try writeRandomFile(dir.file("rand"), count: 200 << 10)
        try runOK("dd", ["if=\(dir.file("rand"))", "of=\(raw)", "bs=1024", "seek=2048", "conv=notrunc", "status=none"])
        let img = dir.file("c.qcow2")
        try qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", raw, img)
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        // Each compressed cluster's extent carries its L2 descriptor: offset, and the bytes up
        // to the end of the last sector it counts.
        let qcow2 = try #require(image as? QCOW2Image)
        var descriptors: [QCOW2CompressedDescriptor] = []
        for cluster in 0..<16 {
            let guest = UInt64(cluster) << 16
            let entry = try qcow2.l2Mapping(guest: guest).entry
            #expect(entry.isCompressed)
            let d = entry.compressedDescriptor(clusterBits: 16)
            descriptors.append(d)
            #expect(try image.blockStatus(at: guest, length: 64 << 10).kind
                    == .compressed(hostOffset: d.hostOffset, length: Int(d.byteLength)))
        }
        // The 1 MiB of compressible data is one extent of compressed clusters (qemu-img packs
        // them back to back): from the first one's bytes to the end of the last one's.
        let first = descriptors[0].hostOffset
        let end = descriptors.map { $0.hostOffset + $0.byteLength }.max()!
        #expect(try image.blockStatus(at: 0, length: 3 << 20)
                == Extent(offset: 0, length: 1 << 20, kind: .compressed(hostOffset: first, length: Int(end - first))))
        #expect(try image.info().formatSpecific?.data["compression-type"]?.stringValue == type)
        // Small reads inside one compressed cluster.
        var small = [UInt8](repeating: 0, count: 10)
        try small.withUnsafeMutableBytes { try image.read(into: $0, at: 1100 * 1024 + 7) }
        #expect(small == [UInt8](repeating: 0x42, count: 10))
    }

    @Test func compressedWithSmallClusters() throws {
        let dir = try TempDir()
        let raw = dir.file("src.raw")
        try qemuImg("create", "-q", "-f", "raw", raw, "1M")
        try qemuIO("-f", "raw", "-c", "write -P 0x21 0 300k", "-c", "write -P 0x42 333k 5k", raw)
        for options in ["cluster_size=512", "cluster_size=2M", "extended_l2=on,compression_type=zstd"] {
            let img = dir.file("c-\(options).qcow2")
            try qemuImg("convert", "-c", "-O", "qcow2", "-o", options, raw, img)
            try expectSameContentAsQemu(img, in: dir)
            try expectBlockStatusMatchesQemu(img)
        }
    }

    @Test func extendedL2Subclusters() throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "2M")
        try qemuIO("-c", "write -P 0xbb 0 2M", base)
        let img = dir.file("e.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
                    "-b", "base.qcow2", "-F", "qcow2", img)
        // 2 KiB subclusters: partial writes leave other subclusters reading from the backing file.
        try qemuIO("-c", "write -P 1 1k 3k", "-c", "write -P 2 70k 2k", "-c", "write -z 72k 4k",
                   "-c", "write -P 3 200k 64k", "-c", "write -z 300k 1k", img)
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        let first = try image.blockStatus(at: 0, length: 64 << 10)
        #expect(first.kind == .data(hostOffset: try hostOf(image, 0)) && first.length == 4096)
        #expect(try image.blockStatus(at: 4096, length: 2048).kind == .backing)
        #expect(try image.blockStatus(at: 72 << 10, length: 4096).kind == .zero)
        #expect(try image.info().formatSpecific?.data["extended-l2"] == .bool(true))

        // Same without a backing file: unallocated subclusters are holes.
        let alone = dir.file("alone.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", alone, "1M")
        try qemuIO("-c", "write -P 1 1k 3k", "-c", "write -z 9k 2k", "-c", "write -P 4 500k 1k", alone)
        try expectSameContentAsQemu(alone, in: dir)
        try expectBlockStatusMatchesQemu(alone)
    }

    private func hostOf(_ image: any DiskImage, _ guest: UInt64) throws -> UInt64? {
        guard let q = image as? QCOW2Image else { return nil }
        if case .normal(let h) = try q.lookup(at: guest, maxLength: 1).kind { return h }
        return nil
    }

    @Test(arguments: [false, true])
    func externalDataFile(raw: Bool) throws {
        let dir = try TempDir()
        let img = dir.file("d.qcow2")
        let data = dir.file("d.data")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "data_file=\(data),data_file_raw=\(raw ? "on" : "off")", img, "2M")
        try qemuIO("-c", "write -P 7 0 100k", "-c", "write -z 512k 64k", "-c", "write -P 8 1M 4k", img)
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        #expect(image.dataFile.path == data)
        // Both files are the image's: the qcow2 file first, then its data file.
        #expect(image.files.count == 2 && image.files[0] === image.file && image.files[1] === image.dataFile)
        #expect(try image.blockStatus(at: 1 << 20, length: 4096).kind == .data(hostOffset: 1 << 20))
        let specific = try image.info().formatSpecific?.data
        #expect(specific?["data-file"]?.stringValue == data && specific?["data-file-raw"] == .bool(raw))
    }

    @Test func internalSnapshots() throws {
        let dir = try TempDir()
        let img = dir.file("s.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", img, "2M")
        try qemuIO("-c", "write -P 1 0 256k", img)
        try qemuImg("snapshot", "-c", "first", img)
        try qemuIO("-c", "write -P 2 64k 64k", "-c", "write -z 128k 64k", img)
        try qemuImg("snapshot", "-c", "second snapshot", img)
        try qemuIO("-c", "write -P 3 1M 4k", "-c", "discard 0 64k", img)
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        let snaps = try image.info().snapshots
        #expect(snaps.map(\.name) == ["first", "second snapshot"])
        #expect(snaps.map(\.id) == ["1", "2"])
    }

    @Test func lazyRefcounts() throws {
        let dir = try TempDir()
        let img = dir.file("l.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "2M")
        try qemuIO("-c", "write -P 9 4k 300k", img)
        try expectSameContentAsQemu(img, in: dir)
        #expect(try ImageOpener.open(img).info().formatSpecific?.data["lazy-refcounts"] == .bool(true))
        // Without a data file, a qcow2 image is one file.
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        #expect(image.files.count == 1 && image.files[0] === image.file)
    }

    @Test func backingChainOfThree() throws {
        let dir = try TempDir()
        try FileManager.default.createDirectory(atPath: dir.file("sub"), withIntermediateDirectories: true)
        // base.raw (1 MiB, shorter than the others) <- mid.qcow2 (2 MiB) <- sub/top.qcow2 (3 MiB).
        let base = dir.file("base.raw")
        try qemuImg("create", "-q", "-f", "raw", base, "1M")
        try qemuIO("-f", "raw", "-c", "write -P 0x0b 0 1M", base)
        let mid = dir.file("mid.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "2M")
        try qemuIO("-c", "write -P 0x0c 512k 64k", "-c", "write -P 0x0d 1536k 4k", "-c", "write -z 100k 8k", mid)
        let top = dir.file("sub/top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", top, "3M")
        try qemuIO("-c", "write -P 0x0e 600k 10k", "-c", "write -P 0x0f 2600k 4k", top)
        try expectSameContentAsQemu(top, in: dir)
        try expectBlockStatusMatchesQemu(top)

        let image = try ImageOpener.open(top)
        defer { try? image.close() }
        #expect(image.backing?.path == dir.file("sub/../mid.qcow2"))
        #expect(image.backing?.backing?.path == dir.file("sub/../base.raw"))
        #expect(image.backing?.backing?.format == .raw)
        // Past the end of the 2 MiB middle layer the top reads zeros: a hole, not backing.
        #expect(try image.blockStatus(at: 2 << 20, length: 512 << 10).kind == .hole)
        #expect(try image.blockStatus(at: 0, length: 64 << 10).kind == .backing)

        // Without a backing format extension the backing file is probed.
        let probed = dir.file("probed.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", probed)
        // qemu-img 7.2 insists on a format; drop it by rewriting the header ourselves.
        var header = try QCOW2Image.open(path: probed).qcow2Header
        header.backingFormat = nil
        var cluster = header.serialized()
        cluster += [UInt8](repeating: 0, count: header.clusterSize - cluster.count)
        try patchFile(probed, at: 0, cluster)
        #expect(try !qemuImg("info", probed).stdout.contains("backing file format"))
        try expectSameContentAsQemu(probed, in: dir)

        // openBacking: false leaves the chain closed.
        let lone = try ImageOpener.open(top, options: OpenOptions(openBacking: false))
        #expect(lone.backing == nil)
        try lone.close()
    }

    @Test func relativeBackingFromRelativeImagePath() throws {
        let dir = try TempDir()
        try qemuImg("create", "-q", "-f", "qcow2", dir.file("b.qcow2"), "1M")
        try qemuIO("-c", "write -P 5 0 64k", dir.file("b.qcow2"))
        try qemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", dir.file("o.qcow2"))
        // A relative path from the current directory (no chdir: tests run in parallel).
        let relative = relativeFromCurrentDirectory(dir.file("o.qcow2"))
        let image = try ImageOpener.open(relative)
        defer { try? image.close() }
        #expect(image.backing?.path == relativeFromCurrentDirectory(dir.path) + "/b.qcow2")
        var b = [UInt8](repeating: 0, count: 4)
        try b.withUnsafeMutableBytes { try image.read(into: $0, at: 100) }
        #expect(b == [5, 5, 5, 5])
    }

    /// Many random writes, zero writes and discards (a fixed seed per configuration), then a
    /// snapshot and more of them, over a backing file: content and map must match qemu's.
    @Test(arguments: ["compat=1.1,cluster_size=64k", "compat=0.10,cluster_size=4k",
                      "extended_l2=on,cluster_size=32k", "cluster_size=512,refcount_bits=2",
                      "cluster_size=2M,lazy_refcounts=on"])
    func randomOperations(options: String) throws {
        let dir = try TempDir()
        let size: UInt64 = 6 << 20
        let base = dir.file("base.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "\(size - 1536 * 1024)")
        try qemuIO("-c", "write -P 0x5a 0 \(size - 1536 * 1024)", base)
        let img = dir.file("rand.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", options, "-b", "base.qcow2", "-F", "qcow2", img, "\(size)")
        // FNV-1a of the options: a fixed, different sequence per configuration.
        var seed: UInt64 = options.utf8.reduce(1_469_598_103_934_665_603) { ($0 ^ UInt64($1)) &* 1_099_511_628_211 }
        func next(_ bound: UInt64) -> UInt64 {
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return (seed >> 33) % bound
        }
        let v2 = options.contains("0.10")
        for round in 0..<2 {
            var commands: [String] = []
            for _ in 0..<40 {
                let offset = next(size / 512) * 512
                let length = min(size - offset, (1 + next(300)) * 512)
                switch next(v2 ? 2 : 3) {
                case 0: commands += ["-c", "write -P \(next(256)) \(offset) \(length)"]
                case 1: commands += ["-c", "discard \(offset) \(length)"]
                default: commands += ["-c", "write -z \(next(2) == 0 ? "-u " : "")\(offset) \(length)"]
                }
            }
            try runOK("qemu-io", commands + [img])
            if round == 0 { try qemuImg("snapshot", "-c", "mid", img) }
        }
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
    }

    @Test(arguments: ["metadata", "falloc", "full"])
    func preallocated(mode: String) throws {
        let dir = try TempDir()
        for options in ["preallocation=\(mode)", "preallocation=\(mode),compat=0.10", "preallocation=\(mode),extended_l2=on"] {
            let img = dir.file("p.qcow2")
            try qemuImg("create", "-q", "-f", "qcow2", "-o", options, img, "3M")
            try qemuIO("-c", "write -P 1 100k 10k", "-c", "write -z 1M 64k", img)
            try expectSameContentAsQemu(img, in: dir)
            try expectBlockStatusMatchesQemu(img)
        }
    }

    @Test func resizedImages() throws {
        let dir = try TempDir()
        let img = dir.file("g.qcow2")
        // 512-byte clusters: one L1 entry covers 32 KiB, so growing moves the L1 table.
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
        try qemuIO("-c", "write -P 1 0 100k", "-c", "write -P 2 1000k 24k", img)
        try qemuImg("resize", "-q", img, "5M")
        try qemuIO("-c", "write -P 3 4M 64k", img)
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
        try qemuImg("resize", "-q", "--shrink", img, "1536K")
        try expectSameContentAsQemu(img, in: dir)
        try expectBlockStatusMatchesQemu(img)
        #expect(try ImageOpener.open(img).virtualSize == 1536 << 10)
    }

    @Test func directIO() throws {
        let dir = try TempDir()
        let raw = dir.file("src.raw")
        try qemuImg("create", "-q", "-f", "raw", raw, "2M")
        try qemuIO("-f", "raw", "-c", "write -P 0x21 0 300k", "-c", "write -P 0x42 1100k 5k", raw)
        let base = dir.file("base.qcow2")
        try qemuImg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", raw, base)
        let top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2", top)
        try qemuIO("-c", "write -P 3 1000 3000", "-c", "write -z 200k 8k", top)
        try expectSameContentAsQemu(top, in: dir, options: OpenOptions(cache: .none))
        let image = try ImageOpener.open(top, options: OpenOptions(cache: .none))
        defer { try? image.close() }
        #expect(image.dataFile.isDirect)
    }

    @Test func readPastEndIsRefused() throws {
        let dir = try TempDir()
        let img = dir.file("p.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        let image = try ImageOpener.open(img)
        defer { try? image.close() }
        var b = [UInt8](repeating: 0, count: 4096)
        expectImageError("read past end") {
            try b.withUnsafeMutableBytes { try image.read(into: $0, at: (1 << 20) - 100) }
        }
        expectImageError("block status past end") { _ = try image.blockStatus(at: 1 << 20, length: 1) }
    }
}
