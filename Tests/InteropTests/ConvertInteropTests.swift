import Foundation
import Testing
import TestSupport

/// `simg convert` against qemu-img on sources qemu-img/qemu-io made, covering the qcow2
/// feature list: output byte-identical (raw) and as sparse, or passing check/compare (qcow2).
@Suite("convert interop") struct ConvertInteropTests {
    /// A qcow2 source with data, written zeros, a zero cluster range and holes.
    static func makeQCOW2(_ dir: TempDir, _ name: String, options: String, size: String = "8M") throws -> String {
        let path = dir.file(name)
        try qemuImg("create", "-q", "-f", "qcow2", "-o", options, path, size)
        try qemuIO("-c", "write -P 0x5a 0 1M", "-c", "write -P 0 1M 512k", "-c", "write -z 2M 1M",
                   "-c", "write -P 0xa5 3700k 300k", "-c", "write -P 0x11 7M 4k", "-c", "write -P 0x12 7340544 1536",
                   path)
        return path
    }

    static let cacheVariants: [[String]] = [[], ["-t", "none"], ["-T", "none"], ["-t", "none", "-T", "none"]]

    @Test("qcow2 v2 and v3 with cluster sizes 512..2M: raw output identical and as sparse, qcow2 output checks",
          arguments: ["compat=0.10", "compat=1.1", "cluster_size=512", "cluster_size=4k",
                      "cluster_size=2M", "extended_l2=on", "extended_l2=on,cluster_size=2M",
                      "refcount_bits=1", "lazy_refcounts=on"])
    func qcow2Variants(options: String) throws {
        let dir = try TempDir()
        let source = try Self.makeQCOW2(dir, "src.qcow2", options: options)
        for cache in Self.cacheVariants {
            try expectRawConvertMatchesQemu(source, in: dir, cache)
        }
        try expectQCOW2ConvertChecks(source, in: dir)
    }

    @Test("extended L2 source with partly written subclusters")
    func extendedL2Subclusters() throws {
        let dir = try TempDir()
        let path = dir.file("sub.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "4M")
        try qemuIO("-c", "write -P 0x31 0 2k", "-c", "write -P 0x32 6k 2k", "-c", "write -z 64k 16k",
                   "-c", "write -P 0x33 70k 1k", "-c", "write -P 0x34 1M 100k", path)
        for cache in Self.cacheVariants { try expectRawConvertMatchesQemu(path, in: dir, cache) }
        try expectQCOW2ConvertChecks(path, in: dir)
        try expectQCOW2ConvertChecks(path, in: dir, ["-o", "extended_l2=on"])
    }

    @Test("compressed sources (zlib, zstd)", arguments: ["zlib", "zstd"])
    func compressedSources(type: String) throws {
        let dir = try TempDir()
        let plain = try Self.makeQCOW2(dir, "plain.qcow2", options: "cluster_size=64k")
        let compressed = dir.file("c.qcow2")
        try qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", plain, compressed)
        // Some clusters rewritten uncompressed on top.
        try qemuIO("-c", "write -P 0x77 512k 64k", compressed)
        for cache in Self.cacheVariants { try expectRawConvertMatchesQemu(compressed, in: dir, cache) }
        try expectQCOW2ConvertChecks(compressed, in: dir)
    }

    @Test("backing chains are flattened: qcow2 backing, raw backing, shorter backing")
    func backingChains() throws {
        let dir = try TempDir()
        let base = try Self.makeQCOW2(dir, "base.qcow2", options: "cluster_size=64k")
        let mid = dir.file("mid.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
        try qemuIO("-c", "write -P 0x66 512k 128k", "-c", "write -z 0 64k", mid)
        let top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", mid, "-F", "qcow2", top)
        try qemuIO("-c", "write -P 0x67 3M 20k", top)
        for cache in Self.cacheVariants { try expectRawConvertMatchesQemu(top, in: dir, cache) }
        try expectQCOW2ConvertChecks(top, in: dir)

        // Raw backing file, shorter than the overlay.
        let rawBase = dir.file("base.raw")
        try convertWritePattern(rawBase, offset: 0, count: 300_000, seed: 3)
        try convertWritePattern(rawBase, offset: 900_000, count: 100_000, seed: 4)
        try convertTruncate(rawBase, to: 1 << 20)
        let overRaw = dir.file("over-raw.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", rawBase, "-F", "raw", overRaw, "3M")
        try qemuIO("-c", "write -P 0x44 64k 64k", "-c", "write -P 0x45 2M 64k", overRaw)
        for cache in Self.cacheVariants { try expectRawConvertMatchesQemu(overRaw, in: dir, cache) }
        try expectQCOW2ConvertChecks(overRaw, in: dir)
    }

    @Test("snapshots present; external data file (also raw)")
    func snapshotsAndDataFile() throws {
        let dir = try TempDir()
        let snap = try Self.makeQCOW2(dir, "snap.qcow2", options: "cluster_size=64k")
        try qemuImg("snapshot", "-c", "s1", snap)
        try qemuIO("-c", "write -P 0x99 0 128k", "-c", "write -z 3700k 64k", snap)
        for cache in Self.cacheVariants { try expectRawConvertMatchesQemu(snap, in: dir, cache) }
        try expectQCOW2ConvertChecks(snap, in: dir)

        for raw in ["off", "on"] {
            let path = dir.file("ext-\(raw).qcow2")
            try qemuImg("create", "-q", "-f", "qcow2", "-o", "data_file=\(dir.file("ext-\(raw).data")),data_file_raw=\(raw)",
                        path, "4M")
            try qemuIO("-c", "write -P 0x21 0 100k", "-c", "write -P 0x22 2M 64k", "-c", "write -z 3M 64k", path)
            for cache in Self.cacheVariants { try expectRawConvertMatchesQemu(path, in: dir, cache) }
            try expectQCOW2ConvertChecks(path, in: dir)
        }
    }

    @Test("raw source whose size is not a multiple of 4096 (or 512)")
    func oddSizedRaw() throws {
        let dir = try TempDir()
        let path = dir.file("odd.raw")
        try convertWritePattern(path, offset: 0, count: 10_000, seed: 7)
        try convertWritePattern(path, offset: 1_048_576, count: 5_555, seed: 8)
        #expect(try convertAllocatedBytes(path) < 1 << 20)
        for cache in Self.cacheVariants { try expectRawConvertMatchesQemu(path, in: dir, cache) }
        try expectQCOW2ConvertChecks(path, in: dir)
        try expectQCOW2ConvertChecks(path, in: dir, ["-t", "none", "-T", "none"])
    }

    @Test("qcow2 output options: cluster sizes, compat=0.10, refcount_bits, extended_l2, preallocation",
          arguments: ["cluster_size=512", "cluster_size=4k", "cluster_size=2M", "compat=0.10",
                      "refcount_bits=1", "refcount_bits=64", "extended_l2=on", "preallocation=metadata",
                      "lazy_refcounts=on"])
    func qcow2OutputOptions(options: String) throws {
        let dir = try TempDir()
        let source = try Self.makeQCOW2(dir, "src.qcow2", options: "cluster_size=64k")
        try expectQCOW2ConvertChecks(source, in: dir, ["-o", options])
        try expectQCOW2ConvertChecks(source, in: dir, ["-o", options, "-t", "none"])
    }

    @Test("several sources are concatenated")
    func severalSources() throws {
        let dir = try TempDir()
        let a = try Self.makeQCOW2(dir, "a.qcow2", options: "cluster_size=64k", size: "7345664")
        let b = dir.file("b.raw")
        try convertWritePattern(b, offset: 4096, count: 70_000, seed: 9)
        try convertTruncate(b, to: 1_000_448)  // a multiple of 512, not of 4096
        let c = try Self.makeQCOW2(dir, "c.qcow2", options: "cluster_size=512", size: "8M")
        let ours = dir.file("ours.raw"), theirs = dir.file("theirs.raw")
        for cache in Self.cacheVariants {
            try simgConvertOK(cache + ["-O", "raw", a, b, c, ours])
            try qemuImg("convert", "-O", "raw", a, b, c, theirs)
            #expect(try filesEqual(ours, theirs), "concatenation with \(cache)")
        }
        let q = dir.file("ours.qcow2")
        try simgConvertOK(["-O", "qcow2", a, b, c, q])
        #expect(try run("qemu-img", ["check", q]).status == 0)
        #expect(try run("qemu-img", ["compare", theirs, q]).status == 0)
    }

    @Test("an 8 TiB empty image converts at once and stays sparse")
    func hugeEmpty() throws {
        let dir = try TempDir()
        let big = dir.file("big.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", big, "8T")
        try qemuIO("-c", "write -P 0x42 5T 64k", big)
        let start = Date()
        let raw = dir.file("big.raw")
        try simgConvertOK(["-O", "raw", big, raw])
        let q = dir.file("big2.qcow2")
        try simgConvertOK(["-O", "qcow2", big, q])
        #expect(Date().timeIntervalSince(start) < 10)
        let attributes = try FileManager.default.attributesOfItem(atPath: raw)
        #expect((attributes[.size] as? NSNumber)?.uint64Value == 8 << 40)
        #expect(try convertAllocatedBytes(raw) < 1 << 20)
        #expect(try run("qemu-img", ["compare", big, q]).status == 0)
        #expect(try convertAllocatedBytes(q) < 4 << 20)
    }
}
