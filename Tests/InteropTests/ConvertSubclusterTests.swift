import Foundation
import Testing
import TestSupport

/// `convert -O qcow2 -o extended_l2=on` of a sparse source: a cluster is allocated for the
/// data it holds, but only the subclusters the source has are written; the others stay
/// unallocated in the L2 bitmap (reading as zeros, or from a backing file), as qemu-img leaves
/// them. Before, each cluster was written whole, zeros included: 13x qemu-img's disk use.
@Suite struct ConvertSubclusterTests {
    /// A 64 MiB raw source with 300 scattered 4 KiB writes (qemu-io), at offsets inside
    /// clusters that vary, a few of them sharing a cluster, plus one dense 1 MiB run that
    /// starts and ends inside a cluster.
    static func makeScatteredSource(_ dir: TempDir) throws -> String {
        let source = dir.file("scattered.raw")
        try qemuImg("create", "-q", "-f", "raw", source, "64M")
        var commands: [String] = []
        for i in 0..<300 {
            let offset = (i * 613 % 1024) * 65536 + (i % 16) * 4096
            commands += ["-c", "write -P \(i % 250 + 1) \(offset) 4k"]
        }
        commands += ["-c", "write -P 0x5a \((40 << 20) + 12288) 1M"]
        try runOK("qemu-io", ["-f", "raw"] + commands + [source])
        return source
    }

    func shape(_ map: [QemuMapEntry]) -> [String] {
        map.map { "\($0.start)+\($0.length) z\($0.zero) d\($0.data)" }
    }

    @Test("sparse source: only the subclusters with data are written",
          arguments: [[String](), ["-t", "none"], ["-t", "writeback"], ["-o", "cluster_size=32k"], ["-S", "0"]])
    func sparseSource(_ arguments: [String]) throws {
        let dir = try TempDir()
        let source = try Self.makeScatteredSource(dir)
        let ours = dir.file("simg.qcow2"), theirs = dir.file("qemu.qcow2")
        let options = arguments.first == "-o" ? ["-o", "extended_l2=on," + arguments[1]] : ["-o", "extended_l2=on"]
        let rest = arguments.first == "-o" ? [] : arguments
        try simgConvertOK(["-f", "raw", "-O", "qcow2"] + options + rest + [source, ours])
        try runOK("qemu-img", ["convert", "-f", "raw", "-O", "qcow2"] + options + rest + [source, theirs])
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, ours)
        let check = try qemuImgResult(["check", ours])
        #expect(check.status == 0, "\(arguments): \(check.stdout) \(check.stderr)")
        let mine = try convertAllocatedBytes(ours), qemus = try convertAllocatedBytes(theirs)
        #expect(Double(mine) <= Double(qemus) * 1.25 + 65536, "\(arguments): simg's output takes \(mine) bytes, qemu-img's \(qemus)")
        // The same subclusters are data, zero or unallocated as in qemu-img's output.
        #expect(shape(try qemuMap(ours)) == shape(try qemuMap(theirs)), "\(arguments): maps differ")
    }

    /// With -B the subclusters the source does not have stay unallocated, so the backing file
    /// shows through them.
    @Test func sparseOverlayKeepsBackingSubclusters() throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), overlay = dir.file("overlay.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "8M")
        try qemuIO("-f", "qcow2", "-c", "write -P 0x11 0 8M", base)
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", base, "-F", "qcow2", overlay)
        try qemuIO("-f", "qcow2", "-c", "write -P 0x22 8k 4k", "-c", "write -P 0x33 1M 6k", "-c", "write -z 2M 4k", overlay)
        let ours = dir.file("simg.qcow2"), theirs = dir.file("qemu.qcow2")
        for (tool, output) in [(simgBinary, ours), ("qemu-img", theirs)] {
            try runOK(tool, ["convert", "-O", "qcow2", "-o", "extended_l2=on", "-B", base, "-F", "qcow2", overlay, output])
        }
        try qemuImg("compare", overlay, ours)
        let check = try qemuImgResult(["check", ours])
        #expect(check.status == 0, "\(check.stdout) \(check.stderr)")
        #expect(try convertAllocatedBytes(ours) <= (try convertAllocatedBytes(theirs)) + 65536)
        // The output's own ranges are the overlay's, rounded out to the 4 KiB of -S (qemu-img
        // keeps them to the 2 KiB subcluster; simg looks at a source's layers per -S unit):
        // everywhere else the backing file shows through.
        let own = try qemuMap(overlay).filter { $0.depth == 0 }
        for entry in try qemuMap(ours) where entry.depth == 0 {
            let inside = own.contains { $0.start / 4096 * 4096 <= entry.start && entry.end <= ($0.end + 4095) / 4096 * 4096 }
            #expect(inside, "\(entry.start)+\(entry.length) is allocated in the output but not in the overlay")
        }
        let depthOne = try qemuMap(ours).filter { $0.depth == 1 }.reduce(UInt64(0)) { $0 + $1.length }
        #expect(depthOne >= (8 << 20) - 3 * 8192, "only \(depthOne) bytes read from the backing file")
    }

    /// Killed at any moment (default path and `-t none`), the output is not a qcow2 yet or
    /// checks clean, and every subcluster it maps holds the source's bytes.
    @Test(arguments: [[String](), ["-t", "none"]])
    func killedWhileConverting(_ arguments: [String]) throws {
        let dir = try TempDir()
        let source = try Self.makeScatteredSource(dir)
        try CrashConsistencyTests().crashConvert(dir, source: source, options: ["-o", "extended_l2=on"] + arguments,
                                                 name: "convert -o extended_l2=on \(arguments)", kills: 12, seed: 41)
    }
}
