import Foundation
import Testing
import TestSupport

/// `simg resize --preallocation=falloc|full` for qcow2 against qemu-img 7.2 (ResizeInteropTests'
/// `compare`): the same messages and status, info, a clean check, the same guest content and
/// the same file bytes (QEMU's layout: new refcount blocks and table at the end of what the
/// image uses, the data clusters after them, L2 tables in the first free clusters), and the
/// data area allocated on disk as qemu-img leaves it. Full disk: exit 1 naming the file, the
/// image as before.
extension ResizeInteropTests {
    static func preallocCases() -> [(String, [[String]], String)] {
        func make(_ options: String, _ size: String, _ io: [String] = []) -> [[String]] {
            var steps = [["qemu-img", "create", "-q", "-f", "qcow2"] + (options.isEmpty ? [] : ["-o", options]) + ["a.qcow2", size]]
            if !io.isEmpty { steps.append(["qemu-io"] + io.flatMap { ["-c", $0] } + ["a.qcow2"]) }
            return steps
        }
        let base = ["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "4M"]
        let baseData = ["qemu-io", "-c", "write -P 7 0 4M", "b.qcow2"]
        return [
            ("empty", make("", "1M"), "+3M"),
            // The cluster holding the old (unaligned) end is mapped anew, its head copied.
            ("data, unaligned end", make("", "1000k", ["write -P 0xab 0 1000k"]), "+3M"),
            // New refcount blocks, a new L1 table, L2 tables in the freed clusters.
            ("512-byte clusters", make("cluster_size=512", "64k", ["write -P 1 0 4k"]), "+3M"),
            ("8-bit refcounts", make("cluster_size=512,refcount_bits=8", "1000k", ["write -P 1 0 1000k"]), "+2M"),
            ("extended L2", make("extended_l2=on", "1000k", ["write -P 0xab 990k 10k"]), "+1M"),
            ("v2", make("compat=0.10", "1M", ["write -P 3 0 64k"]), "+1M"),
            ("L1 moves", make("cluster_size=4096", "4M", ["write -P 5 0 4M"]), "+12M"),
            ("snapshot", make("", "1000k", ["write -P 0xab 0 1000k"]) + [["qemu-img", "snapshot", "-c", "s1", "a.qcow2"]], "+2M"),
            // A longer backing file: the new area is allocated (it reads as zeros), v2 too.
            ("backing", [base, baseData, ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1000k"]], "+1M"),
            ("backing, extended L2", [base, baseData, ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1000k"],
                                      ["qemu-io", "-c", "write -P 0xab 990k 4k", "a.qcow2"]], "+100k"),
            ("backing, v2", [base, baseData, ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M"]], "+1M"),
        ]
    }

    @Test(arguments: ["falloc", "full"])
    func qcow2PreallocatedGrowth(_ mode: String) throws {
        for (name, setup, size) in Self.preallocCases() {
            let (q, s) = try compare(setup, ["--preallocation=\(mode)", "a.qcow2", size], image: "a.qcow2")
            // The data area is on disk in both (allow a few blocks either way for the copies).
            let du = { (d: TempDir) throws -> Int in
                let out = try runOK("du", ["-k", d.file("a.qcow2")]).stdout
                return Int(out.split(separator: "\t").first ?? "") ?? 0
            }
            let qd = try du(q), sd = try du(s)
            let grown = try runOK("stat", ["-c", "%s", s.file("a.qcow2")]).stdout
            #expect(abs(qd - sd) <= 256, "\(name) \(mode): du \(sd) KiB vs qemu-img's \(qd) KiB (file \(grown))")
        }
    }

    /// Refused as qemu-img refuses them: no growth, a v2 image with snapshots.
    @Test func qcow2PreallocationRefusals() throws {
        let plain = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1M"]]
        for mode in ["falloc", "full"] {
            try compare(plain, ["--preallocation=\(mode)", "--shrink", "a.qcow2", "512k"], image: "a.qcow2")
            try compare(plain, ["--preallocation=\(mode)", "a.qcow2", "1M"], image: "a.qcow2")
            try compare(plain + [["qemu-img", "amend", "-q", "-o", "compat=0.10", "a.qcow2"], ["qemu-img", "snapshot", "-c", "s", "a.qcow2"]],
                        ["--preallocation=\(mode)", "a.qcow2", "+1M"], image: "a.qcow2")
        }
    }

    /// A file size limit where the refcount area, the data area, or the last of it does not
    /// fit: exit 1 naming the file and the reason, the image not corrupt, no leak, as before.
    @Test func qcow2PreallocationFileSizeLimit() throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), image = dir.file("x.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", pristine, "1M")
        try qemuIO("-c", "write -P 9 0 64k", pristine)
        let before = try Data(contentsOf: URL(fileURLWithPath: pristine)).count  // 384 KiB
        for mode in ["falloc", "full"] {
            for limit in [before, before + 6000, before + 600_000] {
                try? FileManager.default.removeItem(atPath: image)
                try copySparse(pristine, image)
                let r = try run("prlimit", ["--fsize=\(limit)", simgBinary, "resize", "--preallocation=\(mode)", image, "+3M"])
                #expect(r.status == 1, "\(mode) \(limit): \(r.stderr)")
                #expect(r.stderr.hasPrefix("simg: '\(image)': Could not resize the image: "), "\(r.stderr)")
                #expect(r.stderr.contains("File too large"), "\(r.stderr)")
                let check = try run("qemu-img", ["check", image])
                #expect(check.status == 0, "\(mode) \(limit): \(check.stdout)")
                let cmp = try run("qemu-img", ["compare", pristine, image])
                #expect(cmp.status == 0, "\(mode) \(limit): \(cmp.stdout)")
                let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
                #expect((info["virtual-size"] as? NSNumber)?.intValue == 1 << 20)
            }
        }
    }
}
