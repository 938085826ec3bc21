import Foundation
import Testing
import TestSupport

/// `simg convert -O qcow2`: compressed output (zlib, zstd), every create option, -B, -n, and
/// the host layout of large data runs, each checked with qemu-img check / compare / map.
@Suite struct ConvertQCOW2Tests {
    /// Text that compresses well (about 4:1 with zlib), different on every line.
    static func writeText(_ path: String, offset: UInt64, count: Int) throws {
        var text = [UInt8]()
        text.reserveCapacity(count)
        var line = 0
        while text.count < count {
            text += Array("\(line): the quick brown fox jumps over the lazy dog \(line * 7919 % 1000)\n".utf8)
            line += 1
        }
        if !FileManager.default.fileExists(atPath: path) { FileManager.default.createFile(atPath: path, contents: nil) }
        guard let handle = FileHandle(forWritingAtPath: path) else { throw ToolError.missing(path) }
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        handle.write(Data(text[0..<count]))
    }

    /// A 24 MiB raw source: 8 MiB text, 1 MiB random, 1 MiB written zeros, holes, a text tail
    /// that is not cluster-aligned.
    static func makeSource(_ dir: TempDir) throws -> String {
        let path = dir.file("source.raw")
        try writeText(path, offset: 0, count: 8 << 20)
        try convertWritePattern(path, offset: 9 << 20, count: 1 << 20, seed: 3)
        guard let handle = FileHandle(forWritingAtPath: path) else { throw ToolError.missing(path) }
        try handle.seek(toOffset: 11 << 20)
        handle.write(Data(count: 1 << 20))
        try handle.close()
        try writeText(path, offset: (20 << 20) + 1000, count: 70_000)
        try convertTruncate(path, to: 24 << 20)
        return path
    }

    /// A qcow2 source with data, zero clusters, compressed clusters and unallocated ranges.
    static func makeQCOW2Source(_ dir: TempDir) throws -> String {
        let path = dir.file("source.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", path, "32M")
        try qemuIO("-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -z 3M 1M",
                   "-c", "write -P 0x22 5M 64k", "-c", "write -c -P 0x33 8M 128k",
                   "-c", "write -P 0x44 20M 4k", "-c", "write -P 0x55 31M 1M", path)
        return path
    }

    @Test(arguments: [[String](), ["-o", "compression_type=zstd"], ["-o", "cluster_size=4096"],
                      ["-o", "extended_l2=on"], ["-o", "compat=0.10"]])
    func compressed(_ options: [String]) throws {
        let dir = try TempDir()
        let source = try Self.makeSource(dir)
        let ours = dir.file("simg.qcow2"), theirs = dir.file("qemu.qcow2")
        try simgConvertOK(["-c", "-f", "raw", "-O", "qcow2"] + options + [source, ours])
        try runOK("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2"] + options + [source, theirs])
        try qemuImg("check", ours)
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, ours)
        // qemu-img's human map refuses images holding compressed clusters.
        let map = try run("qemu-img", ["map", ours])
        #expect(map.status != 0 && map.stderr.contains("compressed clusters"), "\(map.stderr)")
        // Smaller than the data, and about the size qemu-img makes (same codec, same packing).
        let size = try FileManager.default.attributesOfItem(atPath: ours)[.size] as? UInt64 ?? 0
        let qemuSize = try FileManager.default.attributesOfItem(atPath: theirs)[.size] as? UInt64 ?? 0
        #expect(size < (5 << 20), "compressed output is \(size) bytes")
        #expect(Double(size) <= Double(qemuSize) * 1.05 + 131072, "simg \(size) bytes, qemu-img \(qemuSize)")
        #expect(Double(size) >= Double(qemuSize) * 0.8, "simg \(size) bytes, qemu-img \(qemuSize)")
        if options.contains("compression_type=zstd") {
            let info = try qemuImg("info", "--output=json", ours).stdout
            #expect(info.contains("\"compression-type\": \"zstd\""))
        }
    }

    @Test(arguments: [[String](), ["-o", "cluster_size=4096"], ["-o", "cluster_size=2M"], ["-o", "compat=0.10"],
                      ["-o", "refcount_bits=1"], ["-o", "refcount_bits=64"], ["-o", "extended_l2=on"],
                      ["-o", "extended_l2=on,cluster_size=32k"], ["-o", "lazy_refcounts=on"],
                      ["-o", "preallocation=metadata"], ["-c", "-o", "refcount_bits=1"]])
    func options(_ options: [String]) throws {
        let dir = try TempDir()
        let source = try Self.makeQCOW2Source(dir)
        try expectQCOW2ConvertChecks(source, in: dir, options)
        let raw = try Self.makeSource(dir)
        try expectQCOW2ConvertChecks(raw, in: dir, options)
    }

    /// A 64 MiB run of data becomes one host-contiguous extent of the output.
    @Test func largeRunIsHostContiguous() throws {
        let dir = try TempDir()
        let source = dir.file("run.raw")
        try convertWritePattern(source, offset: 1 << 20, count: 64 << 20, seed: 9)
        try convertTruncate(source, to: 80 << 20)
        let output = dir.file("run.qcow2")
        try simgConvertOK(["-f", "raw", "-O", "qcow2", source, output])
        try qemuImg("check", output)
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, output)
        let data = try qemuMap(output).filter { $0.data }
        #expect(data.count == 1, "data extents: \(data)")
        #expect(data.first?.start == 1 << 20 && data.first?.length == 64 << 20, "data extents: \(data)")
        #expect(data.first?.offset != nil)
    }

    /// -B: the output keeps the backing file and holds only what the source's top layer
    /// allocates (unallocated ranges stay unallocated, zeroed ones become zero clusters).
    @Test(arguments: [[String](), ["-o", "compat=0.10"], ["-c"], ["-o", "extended_l2=on"]])
    func backing(_ options: [String]) throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), overlay = dir.file("overlay.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "16M")
        try qemuIO("-f", "qcow2", "-c", "write -P 0x61 0 16M", base)
        try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
        try qemuIO("-f", "qcow2", "-c", "write -P 0x62 1M 1M", "-c", "write -z 4M 1M",
                   "-c", "write -P 0x63 8M 64k", "-c", "write -P 0 10M 1M", overlay)
        let output = dir.file("out.qcow2")
        try simgConvertOK(["-O", "qcow2", "-B", base, "-F", "qcow2"] + options + [overlay, output])
        try qemuImg("check", output)
        try qemuImg("compare", overlay, output)
        let info = try qemuImg("info", "--output=json", output).stdout
        #expect(info.contains("\"backing-filename\": \"\(base)\""))

        // Only the overlay's ranges are allocated in the output's top layer.
        let map = try qemuMap(output)
        func top(_ offset: UInt64) -> QemuMapEntry? { map.first { $0.start <= offset && offset < $0.end } }
        for unallocated: UInt64 in [0, 3 << 20, 6 << 20, 9 << 20, 12 << 20, 15 << 20] {
            #expect(top(unallocated)?.depth == 1, "offset \(unallocated): \(String(describing: top(unallocated)))")
        }
        for allocated: UInt64 in [1 << 20, 8 << 20] {
            #expect(top(allocated)?.depth == 0 && top(allocated)?.data == true, "offset \(allocated)")
        }
        // Zeroed over backing data: recorded in the top layer (zero clusters, or written zeros in v2).
        for zeroed: UInt64 in [4 << 20, 10 << 20] {
            #expect(top(zeroed)?.depth == 0, "offset \(zeroed): \(String(describing: top(zeroed)))")
        }
        // And the same allocation map as qemu-img's own `convert -B` (host offsets aside).
        let theirs = dir.file("qemu.qcow2")
        try runOK("qemu-img", ["convert", "-O", "qcow2", "-B", base, "-F", "qcow2"] + options + [overlay, theirs])
        func shape(_ m: [QemuMapEntry]) -> [String] { m.map { "\($0.start)+\($0.length) d\($0.depth) z\($0.zero) \($0.data)" } }
        #expect(shape(map) == shape(try qemuMap(theirs)))
    }

    /// -B where the source's clusters are smaller than the output's: an output cluster that the
    /// source allocates only partly is written whole (through the backing file), as qemu-img does.
    @Test(arguments: [[String](), ["-c"]])
    func backingSmallSourceClusters(_ options: [String]) throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), overlay = dir.file("overlay.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "4M")
        try qemuIO("-f", "qcow2", "-c", "write -P 0x61 0 4M", base)
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base, "-F", "qcow2", overlay)
        try qemuIO("-f", "qcow2", "-c", "write -P 0x62 4k 4k", "-c", "write -P 0x63 100k 8k",
                   "-c", "write -z 200k 4k", overlay)
        let ours = dir.file("simg.qcow2"), theirs = dir.file("qemu.qcow2")
        try simgConvertOK(["-O", "qcow2", "-B", base, "-F", "qcow2"] + options + [overlay, ours])
        try runOK("qemu-img", ["convert", "-O", "qcow2", "-B", base, "-F", "qcow2"] + options + [overlay, theirs])
        try qemuImg("check", ours)
        try qemuImg("compare", overlay, ours)
        func shape(_ m: [QemuMapEntry]) -> [String] { m.map { "\($0.start)+\($0.length) d\($0.depth) z\($0.zero) \($0.data)" } }
        #expect(shape(try qemuMap(ours)) == shape(try qemuMap(theirs)))
    }

    /// -n into a qcow2 that has a backing file, without -B: the output must read exactly as the
    /// source, so zeros over backing data are recorded (zero clusters in v3, written zeros in v2).
    @Test(arguments: ["1.1", "0.10"])
    func existingTargetWithBacking(_ compat: String) throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), target = dir.file("target.qcow2"), source = dir.file("source.raw")
        try qemuImg("create", "-q", "-f", "qcow2", base, "8M")
        try qemuIO("-f", "qcow2", "-c", "write -P 0x61 0 8M", base)
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=\(compat)", "-b", base, "-F", "qcow2", target)
        try convertWritePattern(source, offset: 1 << 20, count: 1 << 20, seed: 4)
        try convertTruncate(source, to: 8 << 20)
        try simgConvertOK(["-n", "-f", "raw", "-O", "qcow2", source, target])
        try qemuImg("check", target)
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, target)
    }

    /// -n into an existing qcow2 (with old contents everywhere): the result equals the source.
    @Test(arguments: [[String](), ["-c"]])
    func existingTarget(_ options: [String]) throws {
        let dir = try TempDir()
        let source = try Self.makeQCOW2Source(dir)
        let target = dir.file("existing.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", target, "32M")
        if options.isEmpty {
            try qemuIO("-f", "qcow2", "-c", "write -P 0x77 0 32M", target)
        }
        try simgConvertOK(["-n", "-O", "qcow2"] + options + [source, target])
        try qemuImg("check", target)
        try qemuImg("compare", source, target)
    }
}
