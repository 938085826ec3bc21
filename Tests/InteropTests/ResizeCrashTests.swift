import Foundation
import Testing
import TestSupport

/// Crash consistency of `simg resize` (the helpers are CrashConsistencyTests.swift's): SIGKILL
/// at random moments and at write boundaries of a grow that moves the L1 table, of a shrink
/// that frees L2 tables, data clusters and refcount blocks, and of falloc/full growth. Every
/// image must pass `qemu-img check` (leaks allowed), have the old or the new size, and read as
/// before up to the smaller.
@Suite struct ResizeCrashTests {
    /// 64 MiB with data in every 2 MiB L2 table (4 KiB clusters) grown to 1 TiB: a new L1 of
    /// 512 Ki entries (4 MiB, with new refcount blocks for it), written while the header still
    /// points at the old one, then the switch, then the old table freed.
    @Test func growMovesL1() throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), image = dir.file("a.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", pristine, "64M")
        var writes: [String] = []
        for k in 0..<32 { writes += ["-c", "write -P \(k + 1) \(k * 2)M 64k"] }
        try runOK("qemu-io", writes + [pristine])
        let before = try crashGuestBytes(pristine, dir)
        let old = UInt64(64 << 20), new = UInt64(1) << 40
        let figures = try crashDrive(name: "resize grow", kills: 12, seed: 12,
                                     arguments: ["resize", image, "1T"], prepare: {
            try? FileManager.default.removeItem(atPath: image)
            try copySparse(pristine, image)
        }, verify: { _ in
            try judge(image, sizes: [old, new], before: before, dir: dir, context: "resize grow")
        })
        print("crash figures: \(figures.summary)")
    }

    /// 64 MiB with 4 KiB clusters, data every 256 KiB, a snapshot sharing half of it, shrunk
    /// to 16 MiB: L2 tables past the end freed, their clusters' references dropped, refcount
    /// blocks left empty dropped, the file cut.
    @Test func shrinkFreesClusters() throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), image = dir.file("a.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", pristine, "64M")
        var writes: [String] = []
        for k in 0..<256 { writes += ["-c", "write -P \(k % 250 + 1) \(k * 256)k 64k"] }
        try runOK("qemu-io", writes + [pristine])
        try qemuImg("snapshot", "-c", "s1", pristine)
        try qemuIO("-c", "write -P 7 40M 8M", "-c", "write -P 9 8M 1M", pristine)
        let before = try crashGuestBytes(pristine, dir)
        let figures = try crashDrive(name: "resize shrink", kills: 12, seed: 13,
                                     arguments: ["resize", "--shrink", image, "16M"], prepare: {
            try? FileManager.default.removeItem(atPath: image)
            try copySparse(pristine, image)
        }, verify: { _ in
            try judge(image, sizes: [64 << 20, 16 << 20], before: before, dir: dir, context: "resize shrink")
        })
        print("crash figures: \(figures.summary)")
    }

    /// 16 MiB with data in every 2 MiB L2 table (4 KiB clusters) grown by 32 MiB with falloc
    /// or full: the L1 moved first, then the refcount area (4 new refcount blocks and a new
    /// table at the end of the file, the header switched to it), the data area fallocated or
    /// zeroed, then the L2 tables mapping it; the size last.
    @Test(arguments: ["falloc", "full"])
    func growPreallocated(_ mode: String) throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), image = dir.file("a.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", pristine, "16M")
        var writes: [String] = []
        for k in 0..<8 { writes += ["-c", "write -P \(k + 1) \(k * 2)M 64k"] }
        try runOK("qemu-io", writes + [pristine])
        let before = try crashGuestBytes(pristine, dir)
        let figures = try crashDrive(name: "resize \(mode)", kills: 16, seed: 14,
                                     arguments: ["resize", "--preallocation=\(mode)", image, "+32M"], prepare: {
            try? FileManager.default.removeItem(atPath: image)
            try copySparse(pristine, image)
        }, verify: { _ in
            try judge(image, sizes: [16 << 20, 48 << 20], before: before, dir: dir, context: "resize \(mode)")
        })
        print("crash figures: \(figures.summary)")
    }

    func judge(_ image: String, sizes: Set<UInt64>, before: [UInt8], dir: TempDir, context: String) throws -> Bool {
        guard try crashQemuCheckClean(image, context: context) else { return false }
        let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
        let size = (info["virtual-size"] as? NSNumber)?.uint64Value ?? 0
        #expect(sizes.contains(size), "\(context): virtual size \(size)")
        guard sizes.contains(size) else { return false }
        // The guest content up to the smaller size is unchanged (read only that far: the grown
        // image is 1 TiB of nothing past the old end).
        let prefix = Int(min(sizes.min()!, size))
        let out = dir.file("prefix.raw")
        defer { try? FileManager.default.removeItem(atPath: out) }
        try qemuImg("dd", "if=\(image)", "of=\(out)", "bs=1M", "count=\(prefix >> 20)", "-O", "raw")
        let same = crashSame(try crashReadAll(out), Array(before[..<prefix]))
        #expect(same, "\(context): the guest content changed")
        return same
    }
}
