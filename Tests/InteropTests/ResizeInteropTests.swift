import Foundation
import Testing
import TestSupport

/// `simg resize` against qemu-img 7.2 on copies of the same images: the same exit status and
/// messages (simg's "simg:" where qemu-img says "qemu-img:"), and afterwards the same
/// `qemu-img info` fields, a clean `qemu-img check`, the same guest content and, for qcow2, the
/// same bytes (qemu-img's allocation order, L1 sizes and file cuts are followed).
@Suite("Resize interop")
struct ResizeInteropTests {
    /// Runs `setup` in a fresh folder, copies it, runs qemu-img resize with `arguments` in
    /// one copy and simg resize in the other; returns both folders after comparing output.
    @discardableResult
    func compare(_ setup: [[String]], _ arguments: [String], image: String? = nil,
                 sameBytes: Bool = true, sourceLocation: SourceLocation = #_sourceLocation) throws -> (q: TempDir, s: TempDir) {
        let q = try TempDir(), s = try TempDir()
        for step in setup { try runOK(step[0], Array(step.dropFirst()), in: q.path) }
        for name in try FileManager.default.contentsOfDirectory(atPath: q.path) {
            try FileManager.default.copyItem(atPath: q.file(name), toPath: s.file(name))
        }
        let expected = try run("qemu-img", ["resize"] + arguments, in: q.path)
        let got = try run(simgBinary, ["resize"] + arguments, in: s.path)
        #expect(got.status == expected.status, "exit status for \(arguments)", sourceLocation: sourceLocation)
        #expect(got.stdout == expected.stdout, "stdout for \(arguments)", sourceLocation: sourceLocation)
        #expect(qemuWords(got.stderr) == expected.stderr,
                "stderr for \(arguments): \(got.stderr)", sourceLocation: sourceLocation)
        guard let image else { return (q, s) }
        let infoQ = try info(q.file(image)), infoS = try info(s.file(image))
        #expect(infoS == infoQ, "info after \(arguments)", sourceLocation: sourceLocation)
        if infoS["format"] == "qcow2" {
            let check = try run("qemu-img", ["check", s.file(image)])
            #expect(check.status == 0, "check after \(arguments): \(check.stdout)", sourceLocation: sourceLocation)
        }
        var identical = false
        if sameBytes {
            identical = try filesEqual(q.file(image), s.file(image))
            #expect(identical, "file bytes after \(arguments)", sourceLocation: sourceLocation)
        }
        // The same bytes read the same; qemu-img compare (minutes for a 2P image: it walks
        // every L2 range) only where they differ.
        if !identical {
            let cmp = try run("qemu-img", ["compare", q.file(image), s.file(image)])
            #expect(cmp.status == 0, "content after \(arguments): \(cmp.stdout)", sourceLocation: sourceLocation)
        }
        return (q, s)
    }

    func qemuWords(_ text: String) -> String { interopQemuWords(text) }
    func info(_ path: String) throws -> [String: String] { try interopComparableInfo(path) }

    static let qcow2 = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "64M"]]
    static let raw = [["truncate", "-s", "1000", "r.raw"]]
    /// 4 GiB, data in several L2 tables, a compressed cluster and zero clusters past 3 GiB.
    static let data = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "4G"],
                       ["qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 1G 2M", "-c", "write -P 0x33 2047M 2M",
                        "-c", "write -P 0x44 3G 64k", "-c", "write -c -P 0x55 3500M 128k", "-c", "write -z 3600M 1M", "a.qcow2"]]

    @Test(arguments: [
        ["a.qcow2", "0"], ["a.qcow2", "-1G"], ["a.qcow2", "-64M"], ["--preallocation=falloc", "a.qcow2", "64M"],
        ["--preallocation=full", "--shrink", "a.qcow2", "32M"], ["a.qcow2", "32M"], ["a.qcow2", "+1000"],
        ["a.qcow2", "12x"], ["a.qcow2", ""], ["a.qcow2", "16E"], ["a.qcow2", "+9E"], ["a.qcow2", "7E"], ["a.qcow2", "3P"],
        ["missing", "1G"], ["a.qcow2"], [], ["-Z"], ["--preallocation=bogus", "a.qcow2", "1G"], ["-U", "a.qcow2", "1G"],
        ["a.qcow2", "1G", "extra"], ["-f", "a.qcow2", "1G"], ["-f", "1G"], ["a.qcow2", "64M", "--shrink"],
        ["a.qcow2", "0x10k"], ["-f", "foo", "a.qcow2", "1G"], ["--shrink", "a.qcow2", "1000"],
    ])
    func refusals(_ arguments: [String]) throws {
        try compare(Self.qcow2, arguments, image: "a.qcow2")
    }

    @Test(arguments: [
        ["a.qcow2", "16T"], ["a.qcow2", "+1G"], ["a.qcow2", "2P"], ["a.qcow2", "100G"], ["-q", "a.qcow2", "+0"],
        ["a.qcow2", "-0"], ["--shrink", "a.qcow2", "1M"], ["--", "a.qcow2", "-32M"], ["--shrink", "a.qcow2", "--", "-32M"],
        ["-f", "qcow2", "a.qcow2", "128M"],
    ])
    func qcow2Resizes(_ arguments: [String]) throws {
        try compare(Self.qcow2, arguments, image: "a.qcow2")
    }

    @Test(arguments: [
        ["--shrink", "a.qcow2", "1G"], ["--shrink", "a.qcow2", "3000M"], ["--shrink", "a.qcow2", "-1500M"],
        ["--shrink", "a.qcow2", "1025M"], ["--shrink", "a.qcow2", "512"], ["--shrink", "a.qcow2", "3600M"], ["a.qcow2", "16T"],
    ])
    func qcow2WithData(_ arguments: [String]) throws {
        try compare(Self.data, arguments, image: "a.qcow2")
    }

    /// v3 with a snapshot (its clusters keep their references), extended L2, 512-byte clusters
    /// (refcount blocks freed by a shrink), v2 (snapshots refuse).
    @Test func qcow2Variants() throws {
        let snap = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "4G"],
                    ["qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 1G 2M", "-c", "write -P 0x33 2047M 2M", "a.qcow2"],
                    ["qemu-img", "snapshot", "-c", "s1", "a.qcow2"],
                    ["qemu-io", "-c", "write -P 0x44 1G 64k", "-c", "write -P 0x55 3G 1M", "a.qcow2"]]
        for size in ["1G", "1500M", "2047M"] { try compare(snap, ["--shrink", "a.qcow2", size], image: "a.qcow2") }
        try compare(snap, ["a.qcow2", "16T"], image: "a.qcow2")
        let ext = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "a.qcow2", "2G"],
                   ["qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 1G 2M", "-c", "write -P 0x33 1500M 4k", "a.qcow2"]]
        for size in ["1G", "1400M"] { try compare(ext, ["--shrink", "a.qcow2", size], image: "a.qcow2") }
        try compare(ext, ["a.qcow2", "5T"], image: "a.qcow2")
        let small = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "64M"],
                     ["qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 60M 2M", "a.qcow2"]]
        for size in ["30M", "1M", "61M"] { try compare(small, ["--shrink", "a.qcow2", size], image: "a.qcow2") }
        // Growing with 512-byte clusters needs new refcount blocks: simg's allocator places
        // them differently (both images are consistent and read the same).
        try compare(small, ["a.qcow2", "5G"], image: "a.qcow2", sameBytes: false)
        let v2 = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "64M"],
                  ["qemu-img", "snapshot", "-c", "s1", "a.qcow2"]]
        try compare(v2, ["a.qcow2", "1G"], image: "a.qcow2")
        try compare([v2[0]], ["a.qcow2", "1T"], image: "a.qcow2")
    }

    /// preallocation=metadata: every new cluster mapped (L2 table, then one run of data per
    /// table), the file extended over them.
    @Test func qcow2Preallocation() throws {
        let setup = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
                     ["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 63M 1M", "a.qcow2"]]
        try compare(setup, ["--preallocation=metadata", "a.qcow2", "1G"], image: "a.qcow2")
        try compare(setup, ["--preallocation=metadata", "a.qcow2", "+100M"], image: "a.qcow2")
        // Past 2 GiB of host clusters a new refcount block is needed: simg's allocator puts it
        // before the run, QEMU's after it.
        try compare(setup, ["--preallocation=metadata", "a.qcow2", "3G"], image: "a.qcow2", sameBytes: false)
        try compare([["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1000k"]],
                    ["--preallocation=metadata", "a.qcow2", "5M"], image: "a.qcow2")
        // falloc and full: QEMU's layout, the same bytes (more cases in ResizePreallocTests).
        for mode in ["falloc", "full"] {
            try compare(setup, ["--preallocation=\(mode)", "a.qcow2", "+8M"], image: "a.qcow2")
        }
    }

    /// An overlay grown over a larger backing file: the new area reads as zeros, not as the
    /// backing file (zero clusters, as QEMU's BDRV_REQ_ZERO_WRITE); v2 cannot, with QEMU's
    /// words; a missing backing file is worded for the whole chain. QEMU also sets the zero
    /// flag past the backing file's end (16 TiB: 2 GiB of L2 tables); simg only where the
    /// backing file reaches, so those files differ in bytes, not in content.
    @Test func overBackingFile() throws {
        let chain = [["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
                     ["qemu-io", "-c", "write -P 1 0 64M", "base.qcow2"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2", "32M"],
                     ["qemu-io", "-c", "write -P 2 1M 1M", "ov.qcow2"]]
        for size in ["48M", "+1536"] { try compare(chain, ["ov.qcow2", size], image: "ov.qcow2") }
        try compare(chain, ["ov.qcow2", "128M"], image: "ov.qcow2", sameBytes: false)
        try compare(chain, ["--shrink", "ov.qcow2", "16M"], image: "ov.qcow2")
        try compare(chain + [["rm", "base.qcow2"]], ["ov.qcow2", "1G"])
        let v2 = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "base.qcow2", "64M"],
                  ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2", "32M"]]
        try compare(v2, ["ov.qcow2", "128M"], image: "ov.qcow2")
        try compare([v2[0].map { $0 == "64M" ? "16M" : $0 }, v2[1]], ["ov.qcow2", "128M"], image: "ov.qcow2")
    }

    @Test(arguments: [
        ["r.raw", "1500"], ["r.raw", "1000"], ["--preallocation=metadata", "r.raw", "1M"], ["-f", "raw", "r.raw", "+1"],
        ["--shrink", "r.raw", "1000"], ["--shrink", "-f", "raw", "r.raw", "512"], ["--preallocation=full", "-f", "raw", "r.raw", "2M"],
        ["--preallocation=falloc", "-f", "raw", "r.raw", "3M"], ["--preallocation=off", "r.raw", "1G"],
    ])
    func rawResizes(_ arguments: [String]) throws {
        let (q, s) = try compare(Self.raw, arguments, image: "r.raw")
        // Preallocation allocates what qemu-img allocates.
        let a = try fileSizes(q.file("r.raw")), b = try fileSizes(s.file("r.raw"))
        #expect(a.size == b.size)
        if arguments.contains(where: { $0.hasPrefix("--preallocation=f") }) { #expect(b.allocated >= b.size) }
    }

    /// An image another process holds for writing is refused with qemu-img's lock message.
    @Test func lockedImage() throws {
        let dir = try TempDir()
        try qemuImg("create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "64M")
        // Held until stopped: the helper waits until qemu-io's lock bytes are in place.
        let holder = try LockHelperProcess("qemu-io", ["a.qcow2"], in: dir.path, holding: dir.file("a.qcow2"),
                                           bytes: LockingInteropTests.qemuWriterBytes)
        defer { holder.stop() }
        let expected = try run("qemu-img", ["resize", dir.file("a.qcow2"), "1G"])
        let got = try simg("resize", dir.file("a.qcow2"), "1G")
        #expect(expected.status == 1 && got.status == 1)
        #expect(qemuWords(got.stderr) == expected.stderr)
    }

    @Test func help() throws {
        let r = try simg("resize", "--help")
        #expect(r.status == 0 && r.stdout.hasPrefix("usage: simg resize"))
    }
}
