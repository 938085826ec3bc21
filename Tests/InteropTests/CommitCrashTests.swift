import Foundation
import Testing
import TestSupport

/// SIGKILL during `simg commit` (at random moments and exactly at pwrite64 boundaries):
/// the top reads through its chain byte for byte as before at every moment, and neither the
/// top nor the base is called corrupt by `qemu-img check` (leaks allowed). The base is
/// smaller than the top (it grows, with a larger L1 table) and the top records zeros over
/// the base's data; small clusters make many metadata writes.
@Suite("Commit crash consistency")
struct CommitCrashTests {
    func makePristine(_ dir: TempDir) throws {
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "8M")
        try qemuIO("-c", "write -P 0xaa 0 8M", base)
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", top, "24M")
        var writes: [String] = []
        for k in 0..<40 {
            // Pieces over the base, zeros over its data, and data past its end.
            writes += ["-c", k % 4 == 1 ? "write -z \(k * 600)k 200k" : "write -P \(k % 250 + 1) \(k * 600)k 300k"]
        }
        try runOK("qemu-io", writes + [top])
        // The top names "base.qcow2": the copies each run starts from.
        try copySparse(base, dir.file("pristine-base.qcow2"))
        try copySparse(top, dir.file("pristine-top.qcow2"))
    }

    func drive(_ name: String, _ extra: [String], seed: UInt64) throws {
        let dir = try TempDir()
        try makePristine(dir)
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        func prepare() throws {
            for (from, to) in [("pristine-base.qcow2", base), ("pristine-top.qcow2", top)] {
                try? FileManager.default.removeItem(atPath: to)
                try copySparse(dir.file(from), to)
            }
        }
        try prepare()
        let before = try crashGuestBytes(top, dir)
        let verify: (Bool) throws -> Bool = { _ in
            guard try crashQemuCheckClean(top, context: name), try crashQemuCheckClean(base, context: name) else { return false }
            let same = crashSame(try crashGuestBytes(top, dir), before)
            #expect(same, "\(name): the top's content changed")
            return same
        }
        var figures = try crashDrive(name: name, kills: 14, seed: seed, arguments: ["commit"] + extra + [top],
                                     prepare: prepare, verify: verify)
        try crashSweep(&figures, arguments: ["commit"] + extra + [top], points: 24, prepare: prepare, verify: verify)
        print("crash figures: \(figures.summary)")
        #expect(figures.bad == 0)
    }

    @Test func commitAndEmpty() throws { try drive("commit", [], seed: 12) }
    @Test func commitKeepingTheTop() throws { try drive("commit -d", ["-d"], seed: 13) }
}
