import Foundation
import Testing
import TestSupport

/// `simg snapshot` against qemu-img 7.2 on copies of the same images: messages and exit
/// codes, the `-l` table (TZ fixed), and after -c/-a/-d the same snapshot rows (dates aside),
/// a clean `qemu-img check` and the same guest content.
@Suite("Snapshot interop")
struct SnapshotInteropTests {
    typealias Editor = CheckInteropTests.Editor

    /// qemu-img's output with its name swapped for simg's (its raw-probing warning included:
    /// simg prints it too).
    static func qemuWords(_ text: String) -> String {
        text.replacingOccurrences(of: "qemu-img: ", with: "simg: ")
            .replacingOccurrences(of: "'qemu-img --help'", with: "'simg --help'")
    }

    /// Runs `snapshot arguments` with both tools (in `dir`, TZ=UTC), each on its own copy of
    /// `image` when `copies`, and expects the same status, stdout and stderr.
    @discardableResult
    static func same(_ arguments: [String], _ dir: TempDir, image: String?, copies: Bool = true,
                     sourceLocation: SourceLocation = #_sourceLocation) throws -> (simg: String?, qemu: String?) {
        // Both copies go by the same name (relative, in their own folders) in the messages.
        var simgImage = image, qemuImage = image
        if let image, copies {
            for side in ["simg", "qemu"] {
                try FileManager.default.createDirectory(atPath: dir.file(side), withIntermediateDirectories: true)
                try? FileManager.default.removeItem(atPath: dir.file(side + "/" + image))
                try copySparse(dir.file(image), dir.file(side + "/" + image))
            }
            simgImage = "simg/" + image
            qemuImage = "qemu/" + image
        }
        let s = try run("env", ["TZ=UTC", simgBinary, "snapshot"] + arguments + (simgImage.map { [$0] } ?? []), in: dir.path)
        let q = try run("env", ["TZ=UTC", "qemu-img", "snapshot"] + arguments + (qemuImage.map { [$0] } ?? []), in: dir.path)
        #expect(s.status == q.status, "\(arguments): simg \(s.status) \(s.stderr), qemu-img \(q.status) \(q.stderr)", sourceLocation: sourceLocation)
        #expect(s.stdout == q.stdout, "\(arguments)", sourceLocation: sourceLocation)
        #expect(s.stderr.replacingOccurrences(of: "simg/", with: "") == qemuWords(q.stderr).replacingOccurrences(of: "qemu/", with: ""),
                "\(arguments)", sourceLocation: sourceLocation)
        return (simgImage.map { dir.file($0) }, qemuImage.map { dir.file($0) })
    }

    /// `qemu-img snapshot -l` rows without the date columns.
    static func rows(_ image: String) throws -> [String] {
        let out = try qemuImg("snapshot", "-l", image).stdout
        return out.split(separator: "\n").dropFirst(2).map { line in
            let l = String(line)
            // ID and TAG (27 columns), VM SIZE (8), date (20), then clock and icount.
            let chars = Array(l)
            return String(chars.prefix(35)) + String(chars.dropFirst(55))
        }
    }

    static func expectClean(_ image: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try qemuImgResult(["check", image])
        #expect(r.status == 0 && r.stdout.hasPrefix("No errors were found"), "\(image): \(r.stdout) \(r.stderr)", sourceLocation: sourceLocation)
    }

    static func expectSameContent(_ a: String, _ b: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try qemuImgResult(["compare", "-U", a, b])
        #expect(r.status == 0, "\(a) vs \(b): \(r.stdout)", sourceLocation: sourceLocation)
    }

    /// 64 MiB qcow2 with data in three L2 ranges (and a zero cluster, a compressed cluster).
    static func makeImage(_ path: String, options: [String] = []) throws {
        _ = try runOK("qemu-img", ["create", "-q", "-f", "qcow2"] + options + [path, "1G"])
        _ = try qemuIO("-c", "write -P 1 0 1M", "-c", "write -P 2 600M 192k", "-c", "write -z 700M 64k", path)
        _ = try qemuIO("-c", "write -c -P 3 900M 64k", path)
    }

    @Test func refusalsMatch() throws {
        let dir = try TempDir()
        try Self.makeImage(dir.file("a.qcow2"))
        _ = try qemuImg("create", "-q", "-f", "raw", dir.file("r.raw"), "1M")
        _ = try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-o", "data_file=a.data", "ext.qcow2", "64M")
        for args in [["-l", "-c", "x"], ["-c", "x", "-l"], ["-a", "x", "-d", "y"], ["-l", "-l"], ["-c", "x", "-c", "y"],
                     ["-f", "qcow2", "-l"], ["-U", "-c", "x"], ["-U"], [],
                     ["-a", "nosuch"], ["-d", "nosuch"], ["-d", "1"]] {
            try Self.same(args, dir, image: "a.qcow2")
        }
        for args in [["-a"], ["-d"], ["-c"], ["-l"]] { try Self.same(args, dir, image: nil) }
        try Self.same(["-c", "x"], dir, image: "missing.qcow2", copies: false)
        for args in [["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"], []] { try Self.same(args, dir, image: "r.raw") }
        for args in [["-l"], ["-c", "x"], ["-a", "x"], ["-d", "x"]] { try Self.same(args, dir, image: "ext.qcow2") }
        // Every cluster's refcount is already at refcount_bits=1's maximum.
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", dir.file("one.qcow2"), "64M")
        _ = try qemuIO("-c", "write 0 64k", dir.file("one.qcow2"))
        let (s, _) = try Self.same(["-c", "x"], dir, image: "one.qcow2")
        // simg refuses before writing anything (qemu-img leaks a cluster).
        #expect(try filesEqual(try #require(s), dir.file("one.qcow2")))
    }

    @Test func listMatches() throws {
        let dir = try TempDir()
        try Self.makeImage(dir.file("a.qcow2"))
        // No snapshots: nothing printed.
        try Self.same(["-l"], dir, image: "a.qcow2", copies: false)
        for name in ["s1", "s1", "a-much-longer-snapshot-name-than-the-column", "3"] {
            _ = try qemuImg("snapshot", "-c", name, dir.file("a.qcow2"))
        }
        _ = try qemuImg("snapshot", "-d", "3", dir.file("a.qcow2"))
        for args in [["-l"], ["-q", "-l"], ["-U", "-l"]] { try Self.same(args, dir, image: "a.qcow2", copies: false) }
        let list = try run("env", ["TZ=UTC", simgBinary, "snapshot", "-l", dir.file("a.qcow2")])
        #expect(list.stdout.hasPrefix("Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n1         s1  "))
    }

    /// The same steps with both tools on copies: after each the snapshot rows, check and
    /// content agree; a snapshot applied gives back the content it was taken of.
    @Test(arguments: [[String](), ["-o", "compat=0.10"], ["-o", "extended_l2=on"], ["-o", "cluster_size=4096"],
                      ["-o", "refcount_bits=64"]])
    func createApplyDeleteMatch(_ options: [String]) throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2")
        try Self.makeImage(base, options: options)
        let s = dir.file("s.qcow2"), q = dir.file("q.qcow2")
        try copySparse(base, s)
        try copySparse(base, q)
        _ = try qemuImg("convert", "-O", "raw", base, dir.file("t0.raw"))
        func both(_ args: String..., write: String? = nil) throws {
            let rs = try simg(["snapshot"] + args + [s])
            let rq = try qemuImgResult(["snapshot"] + args + [q])
            #expect(rs.status == rq.status && rs.stderr == Self.qemuWords(rq.stderr), "\(args): \(rs.stderr) / \(rq.stderr)")
            if let write {
                _ = try qemuIO("-c", write, s)
                _ = try qemuIO("-c", write, q)
            }
            #expect(try Self.rows(s) == Self.rows(q), "\(args)")
            try Self.expectClean(s)
            try Self.expectSameContent(s, q)
        }
        try both("-c", "first", write: "write -P 9 0 64k")
        _ = try qemuImg("convert", "-O", "raw", s, dir.file("t1.raw"))
        try both("-c", "second", write: "write -P 8 600M 64k")
        try both("-c", "first")
        try both("-a", "1")
        try Self.expectSameContent(s, dir.file("t0.raw"))
        try both("-a", "second")
        try Self.expectSameContent(s, dir.file("t1.raw"))
        try both("-d", "first")
        try both("-a", "first", write: "write -P 7 900M 64k")
        try both("-d", "first")
        try both("-d", "second")
        try both("-d", "second")
        // What one tool made, the other reads and changes.
        _ = try simg("snapshot", "-c", "by-simg", q)
        _ = try qemuIO("-c", "write -P 6 0 1M", q)
        _ = try qemuImg("snapshot", "-a", "by-simg", q)
        try Self.expectClean(q)
        try Self.expectSameContent(q, s)
        _ = try qemuImg("snapshot", "-d", "by-simg", q)
        try Self.expectClean(q)
        let extra = try Editor(path: s)
        #expect(try extra.u32(60) == 0 && extra.u64(64) == 0)
    }

    /// The extra data QEMU writes: 24 bytes (VM state size 0, the disk size, icount 0).
    @Test func createdEntryIsQemus() throws {
        let dir = try TempDir()
        let image = dir.file("a.qcow2")
        try Self.makeImage(image)
        let r = try simg("snapshot", "-c", "x", image)
        #expect(r.status == 0, "\(r.stderr)")
        let e = Editor(path: image)
        let table = try e.u64(64)
        #expect(try e.u32(60) == 1)
        #expect(try e.u32(table + 36) == 24)
        #expect(try e.u64(table + 40) == 0 && e.u64(table + 48) == 1 << 30 && e.u64(table + 56) == 0)
        let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
        let snapshot = try #require((info["snapshots"] as? [[String: Any]])?.first)
        #expect(snapshot["id"] as? String == "1" && snapshot["name"] as? String == "x")
        #expect(snapshot["icount"] as? Int == 0 && snapshot["vm-clock-sec"] as? Int == 0)
        let now = Int(Date().timeIntervalSince1970)
        #expect(abs((snapshot["date-sec"] as? Int ?? 0) - now) < 60)
        // A 300-byte name is stored as its first 255 bytes, as qemu-img stores it.
        _ = try simg("snapshot", "-c", String(repeating: "n", count: 300), image)
        let names = try #require(try jsonObject(try qemuImg("info", "--output=json", image).stdout)["snapshots"] as? [[String: Any]])
        #expect((names.last?["name"] as? String)?.count == 255)
    }

    /// A snapshot whose L1 table is malformed: every write action is refused and nothing in
    /// the file changes.
    @Test func malformedSnapshotL1IsRefusedBeforeWriting() throws {
        let dir = try TempDir()
        let image = dir.file("a.qcow2")
        try Self.makeImage(image)
        _ = try qemuImg("snapshot", "-c", "s1", image)
        _ = try qemuImg("snapshot", "-c", "s2", image)
        let e = Editor(path: image)
        let table = try e.u64(64)
        for (damage, offset) in [("unaligned", try e.u64(table) + 8), ("past the end", UInt64(1) << 40)] {
            let copy = dir.file("bad.qcow2")
            try? FileManager.default.removeItem(atPath: copy)
            try copySparse(image, copy)
            try Editor(path: copy).put64(table, offset)
            let pristine = dir.file("pristine.qcow2")
            try? FileManager.default.removeItem(atPath: pristine)
            try copySparse(copy, pristine)
            for args in [["-c", "x"], ["-d", "s1"], ["-d", "s2"], ["-a", "s1"], ["-a", "s2"]] {
                let r = try simg(["snapshot"] + args + [copy])
                #expect(r.status == 1 && r.stderr.contains("Snapshot L1 table offset invalid"), "\(damage) \(args): \(r.stderr)")
                #expect(try filesEqual(copy, pristine), "\(damage) \(args) changed the file")
            }
        }
    }
}

extension SnapshotInteropTests {
    /// A malformed snapshot table (the damage check detects): every write action is refused
    /// before anything is written, where qemu-img refuses too or not.
    @Test(arguments: CheckSnapshotTableTests.TableDamage.allCases)
    func brokenTableIsRefusedBeforeWriting(_ d: CheckSnapshotTableTests.TableDamage) throws {
        let dir = try TempDir()
        let image = dir.file("img.qcow2")
        let table = try CheckSnapshotTableTests.makeSnapshotImage(image, content: dir.file("before.raw"))
        try CheckSnapshotTableTests.damage(d, image, table: table)
        let pristine = dir.file("pristine.qcow2")
        try copySparse(image, pristine)
        for args in [["-c", "x"], ["-d", "s1"], ["-a", "s1"], ["-a", "1"]] {
            let r = try simg(["snapshot"] + args + [image])
            let q = try qemuImgResult(["snapshot"] + args + [try copy(pristine, dir)])
            #expect(r.status == 1, "\(d) \(args): simg exited \(r.status); qemu-img \(q.status) \(q.stderr)")
            #expect(try filesEqual(image, pristine), "\(d) \(args) changed the file")
        }
    }

    private func copy(_ path: String, _ dir: TempDir) throws -> String {
        let target = dir.file("qemu-copy.qcow2")
        try? FileManager.default.removeItem(atPath: target)
        try copySparse(path, target)
        return target
    }
}
