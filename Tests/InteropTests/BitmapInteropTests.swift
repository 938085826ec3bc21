import Foundation
import Testing
import TestSupport

/// `simg bitmap` against qemu-img 7.2 on copies of the same images (made by qemu-img and
/// qemu-io, with data and bitmaps qemu wrote): exit codes and messages, the bitmap lists
/// `qemu-img info` shows afterwards (and `simg info` the same), a clean `qemu-img check`, and
/// the bits themselves, read through a qemu-nbd export by nbdinfo.
@Suite("Bitmap interop")
struct BitmapInteropTests {
    /// Images in `dir`: a.qcow2 (4 MiB, bitmaps b1 enabled and b2 disabled at 128k, both
    /// dirty from qemu-io writes), iu.qcow2 (the same with both left in use by a killed
    /// qemu-io), e.qcow2 (empty), big.qcow2 (8 MiB), v2.qcow2, r.raw.
    static func makeImages(_ dir: TempDir) throws {
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "a.qcow2", "4M")
        try qemuImg(in: dir.path, "bitmap", "--add", "a.qcow2", "b1")
        try qemuImg(in: dir.path, "bitmap", "--add", "--disable", "-g", "128k", "a.qcow2", "b2")
        try qemuIO(in: dir.path, "-c", "write 0 64k", "-c", "write 1M 200k", "a.qcow2")
        try qemuImg(in: dir.path, "bitmap", "--enable", "a.qcow2", "b2")
        try qemuIO(in: dir.path, "-c", "write 3M 4k", "-c", "write 2000k 1k", "a.qcow2")
        try qemuImg(in: dir.path, "bitmap", "--disable", "a.qcow2", "b2")
        try qemuIO(in: dir.path, "-c", "write 3500k 8k", "a.qcow2")
        try copySparse(dir.file("a.qcow2"), dir.file("iu.qcow2"))
        // qemu-io marks the bitmaps in use when it opens the image read-write; killed, it
        // never stores them back.
        _ = try run("qemu-io", ["-c", "sigraise 9", "iu.qcow2"], in: dir.path)
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "e.qcow2", "4M")
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "big.qcow2", "8M")
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "4M")
        try qemuImg(in: dir.path, "create", "-q", "-f", "raw", "r.raw", "4M")
        // sm.qcow2: 512-byte clusters, so a 512-byte-granularity bitmap's table has two data
        // clusters; with an internal snapshot and a backing file (not opened by bitmap).
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "e.qcow2", "-F", "qcow2",
                    "sm.qcow2", "4M")
        try qemuImg(in: dir.path, "bitmap", "--add", "-g", "512", "sm.qcow2", "f")
        try qemuImg(in: dir.path, "bitmap", "--add", "sm.qcow2", "d")
        try qemuIO(in: dir.path, "-c", "write 0 1k", "-c", "write 3M 5k", "-c", "write 4000k 512", "sm.qcow2")
        try qemuImg(in: dir.path, "snapshot", "-c", "s1", "sm.qcow2")
        // st.qcow2: a.qcow2 with its autoclear bit cleared, as a program without bitmap support
        // leaves it (the bitmaps are stale).
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.file("a.qcow2"))))
        bytes[95] &= ~1
        try Data(bytes).write(to: URL(fileURLWithPath: dir.file("st.qcow2")))
    }

    /// qemu-img's stderr in simg's words: its name, and the file name where it names a block
    /// node ('#block123', a number that changes from run to run).
    static func qemuWords(_ text: String, image: String) -> String {
        var t = text.replacingOccurrences(of: "qemu-img: ", with: "simg: ")
            .replacingOccurrences(of: "'qemu-img --help'", with: "'simg --help'")
        t = t.replacingOccurrences(of: "#block[0-9]+", with: image, options: .regularExpression)
        // qemu-img's stale-bitmaps warning lacks its final newline; simg ends the line.
        let fix = "run 'qemu-img check -r' on the image file to fix."
        return t.replacingOccurrences(of: fix, with: fix + "\n")
    }

    /// The bitmaps `qemu-img info --output=json` lists (name, granularity, flags).
    static func bitmaps(_ path: String, simgInfo: Bool = false) throws -> String {
        let out = simgInfo ? try simg("info", "-U", "--output=json", path).stdout
                           : try qemuImg("info", "-U", "--output=json", path).stdout
        let info = try jsonObject(out)
        let data = (info["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        let list = (data?["bitmaps"] as? [[String: Any]]) ?? []
        return list.map { "\($0["name"] ?? "")/\($0["granularity"] ?? "")/\(($0["flags"] as? [String]) ?? [])" }
            .joined(separator: " ")
    }

    /// nbdinfo's map of a bitmap's dirty ranges, through a read-only qemu-nbd export.
    static func dirtyMap(_ path: String, _ bitmap: String) throws -> String {
        guard which("nbdinfo") != nil else { throw ToolError.missing("nbdinfo (libnbd-bin)") }
        let r = try run("nbdinfo", ["--map=qemu:dirty-bitmap:\(bitmap)", "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
                                    "-B", bitmap, path, "]"])
        #expect(r.status == 0, "nbdinfo \(bitmap) of \(path): \(r.stderr)")
        return r.stdout
    }

    /// Runs `bitmap arguments` (IMG standing for the image) with both tools on their own
    /// copies of `image`, and expects the same status and stderr, the same bitmap lists after
    /// (simg info's too), a clean check, and the same bits in every bitmap.
    static func same(_ arguments: [String], _ dir: TempDir, image: String,
                     sourceLocation: SourceLocation = #_sourceLocation) throws {
        for side in ["simg", "qemu"] {
            try FileManager.default.createDirectory(atPath: dir.file(side), withIntermediateDirectories: true)
            try? FileManager.default.removeItem(atPath: dir.file(side + "/" + image))
            try copySparse(dir.file(image), dir.file(side + "/" + image))
        }
        func args(_ side: String) -> [String] { arguments.map { $0 == "IMG" ? side + "/" + image : $0 } }
        let s = try run(simgBinary, ["bitmap"] + args("simg"), in: dir.path)
        let q = try run("qemu-img", ["bitmap"] + args("qemu"), in: dir.path)
        #expect(s.status == q.status, "\(arguments): simg \(s.status) \(s.stderr), qemu-img \(q.status) \(q.stderr)", sourceLocation: sourceLocation)
        #expect(s.stderr.replacingOccurrences(of: "simg/", with: "")
                == qemuWords(q.stderr.replacingOccurrences(of: "qemu/", with: ""), image: image),
                "\(arguments)", sourceLocation: sourceLocation)
        guard image.hasSuffix(".qcow2") else { return }
        let simgImage = dir.file("simg/" + image), qemuImage = dir.file("qemu/" + image)
        // An image qemu-img cannot open (hostile cases): nothing more to compare.
        guard try qemuImgResult(["info", "-U", qemuImage]).status == 0 else { return }
        let list = try bitmaps(qemuImage)
        #expect(try bitmaps(simgImage) == list, "\(arguments)", sourceLocation: sourceLocation)
        #expect(try bitmaps(simgImage, simgInfo: true) == list, "\(arguments): simg info", sourceLocation: sourceLocation)
        // Clean, or leaking as qemu-img's copy leaks (stale bitmaps' clusters).
        let check = try qemuImgResult(["check", simgImage]), qemuCheck = try qemuImgResult(["check", qemuImage])
        #expect(check.status == qemuCheck.status && (check.status == 0 || check.status == 3),
                "\(arguments): \(check.stdout) / qemu-img's copy: \(qemuCheck.stdout)", sourceLocation: sourceLocation)
        let info = try jsonObject(try qemuImg("info", "--output=json", qemuImage).stdout)
        let data = (info["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        for bitmap in (data?["bitmaps"] as? [[String: Any]]) ?? [] {
            guard let name = bitmap["name"] as? String, !((bitmap["flags"] as? [String]) ?? []).contains("in-use") else { continue }
            #expect(try dirtyMap(simgImage, name) == dirtyMap(qemuImage, name), "\(arguments): bits of \(name)",
                    sourceLocation: sourceLocation)
        }
    }

    @Test func refusalsMatch() throws {
        let dir = try TempDir()
        try Self.makeImages(dir)
        let long = String(repeating: "n", count: 1024)
        let cases: [(String, [String])] = [
            ("e.qcow2", ["IMG", "x"]), ("e.qcow2", ["--add", "IMG"]), ("e.qcow2", ["--add", "IMG", "x", "y"]),
            ("e.qcow2", ["--add", "-g", "1000", "IMG", "x"]), ("e.qcow2", ["--add", "-g", "256", "IMG", "x"]),
            ("e.qcow2", ["--add", "-g", "4G", "IMG", "x"]), ("e.qcow2", ["--add", "-g", "abc", "IMG", "x"]),
            ("e.qcow2", ["--add", "-g", "16E", "IMG", "x"]), ("e.qcow2", ["--remove", "-g", "64k", "IMG", "x"]),
            ("e.qcow2", ["--remove", "-b", "x", "IMG", "x"]), ("e.qcow2", ["--remove", "-F", "qcow2", "IMG", "x"]),
            ("e.qcow2", ["--add", "-b", "x", "-F", "raw", "IMG", "x"]),
            ("e.qcow2", ["--add", "--add", "IMG", "x"]), ("e.qcow2", ["--add", "IMG", ""]),
            ("e.qcow2", ["--add", "IMG", long]), ("e.qcow2", ["--add", "--foo", "IMG", "x"]), ("e.qcow2", ["--merge"]),
            ("v2.qcow2", ["--add", "IMG", "x"]), ("v2.qcow2", ["--remove", "IMG", "x"]),
            ("r.raw", ["--add", "-f", "raw", "IMG", "x"]), ("r.raw", ["--clear", "-f", "raw", "IMG", "x"]),
            ("r.raw", ["--merge", "b1", "-f", "raw", "IMG", "x"]),
            ("a.qcow2", ["--remove", "IMG", "nob"]), ("a.qcow2", ["--enable", "IMG", "nob"]),
            ("a.qcow2", ["--merge", "b1", "IMG", "nob"]), ("a.qcow2", ["--merge", "nob", "IMG", "b2"]),
            ("a.qcow2", ["--merge", "b1", "-b", "e.qcow2", "IMG", "b2"]),
            ("a.qcow2", ["--merge", "b1", "-b", "r.raw", "IMG", "b2"]),
            ("a.qcow2", ["--merge", "b1", "-b", "nonexist", "IMG", "b2"]),
            ("big.qcow2", ["--add", "--merge", "b1", "-b", "a.qcow2", "IMG", "t"]),
            ("iu.qcow2", ["--clear", "IMG", "b1"]), ("iu.qcow2", ["--enable", "IMG", "b1"]),
            ("iu.qcow2", ["--disable", "IMG", "b2"]), ("iu.qcow2", ["--merge", "b2", "IMG", "b1"]),
            ("iu.qcow2", ["--merge", "nob", "IMG", "b1"]), ("iu.qcow2", ["--add", "--merge", "b1", "IMG", "b9"]),
            ("a.qcow2", ["--merge", "b1", "-b", "iu.qcow2", "IMG", "b2"]),
        ]
        for (image, args) in cases { try Self.same(args, dir, image: image) }
        // -b naming the image itself: its own write lock keeps the reader out.
        try Self.same(["--merge", "b1", "-b", "IMG", "IMG", "b2"], dir, image: "a.qcow2")
    }

    @Test func sequencesMatch() throws {
        let dir = try TempDir()
        try Self.makeImages(dir)
        let cases: [(String, [String])] = [
            ("e.qcow2", ["--add", "IMG", "x"]), ("e.qcow2", ["--add", "-g", "2G", "IMG", "x"]),
            ("e.qcow2", ["--add", "-g", "4295032832", "IMG", "x"]), ("e.qcow2", ["--add", "--remove", "IMG", "x"]),
            ("e.qcow2", ["--add", "--disable", "--enable", "--disable", "IMG", "x"]),
            ("e.qcow2", ["--add", "--ena", "IMG", "x"]),
            ("a.qcow2", ["--remove", "IMG", "b1"]), ("a.qcow2", ["--clear", "IMG", "b1"]),
            ("a.qcow2", ["--enable", "--disable", "IMG", "b2"]), ("a.qcow2", ["--enable", "IMG", "b2"]),
            ("a.qcow2", ["--merge", "b1", "IMG", "b2"]), ("a.qcow2", ["--merge", "b2", "IMG", "b1"]),
            ("a.qcow2", ["--add", "-g", "512", "--merge", "b2", "--merge", "b1", "IMG", "n"]),
            ("a.qcow2", ["--add", "-g", "1M", "--merge", "b1", "--disable", "IMG", "n"]),
            ("a.qcow2", ["--clear", "--merge", "b2", "IMG", "b1"]),
            ("a.qcow2", ["--merge", "b1", "-b", "a.qcow2", "IMG", "b2"]),
            ("e.qcow2", ["--add", "--merge", "b2", "-b", "a.qcow2", "-F", "qcow2", "IMG", "n"]),
            // A refusal after successful actions keeps them.
            ("a.qcow2", ["--add", "--add", "IMG", "b3"]), ("a.qcow2", ["--remove", "--remove", "IMG", "b1"]),
            ("iu.qcow2", ["--remove", "IMG", "b1"]), ("iu.qcow2", ["--remove", "--add", "IMG", "b2"]),
            ("iu.qcow2", ["--add", "--merge", "b1", "-b", "a.qcow2", "IMG", "b9"]),
            ("sm.qcow2", ["--add", "-g", "1k", "--merge", "f", "--merge", "d", "IMG", "n"]),
            ("sm.qcow2", ["--clear", "--merge", "d", "IMG", "f"]), ("sm.qcow2", ["--merge", "f", "IMG", "d"]),
            ("sm.qcow2", ["--remove", "IMG", "f"]),
            ("st.qcow2", ["--add", "IMG", "b1"]), ("st.qcow2", ["--remove", "IMG", "b1"]),
            ("a.qcow2", ["--add", "--merge", "b1", "-b", "st.qcow2", "IMG", "n"]),
        ]
        for (image, args) in cases { try Self.same(args, dir, image: image) }
    }

    /// The stale-bitmaps warning at every open of such an image, and of such a backing file
    /// when the chain is opened (not by a plain `info` of the overlay), once per open, as
    /// qemu-img prints it.
    @Test func staleBitmapsWarnAtEveryOpen() throws {
        let dir = try TempDir()
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "st.qcow2", "4M")
        try qemuImg(in: dir.path, "bitmap", "--add", "st.qcow2", "b")
        try qemuIO(in: dir.path, "-c", "write 0 64k", "st.qcow2")
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.file("st.qcow2"))))
        bytes[95] &= ~1
        try Data(bytes).write(to: URL(fileURLWithPath: dir.file("st.qcow2")))
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-b", "st.qcow2", "-F", "qcow2", "ov.qcow2", "4M")
        let commands: [[String]] = [
            ["info", "st.qcow2"], ["info", "-U", "st.qcow2"], ["info", "ov.qcow2"],
            ["info", "--backing-chain", "ov.qcow2"], ["check", "st.qcow2"], ["check", "ov.qcow2"],
            ["snapshot", "-l", "st.qcow2"], ["convert", "-O", "raw", "ov.qcow2", "out.raw"],
        ]
        var warned = 0
        for command in commands {
            let q = try qemuImgResult(in: dir.path, command)
            let s = try run(simgBinary, command, in: dir.path)
            #expect(s.status == q.status, "\(command)")
            #expect(s.stderr == Self.qemuWords(q.stderr, image: "st.qcow2"), "\(command): \(s.stderr)")
            if s.stderr.contains("lacking bitmap support") { warned += 1 }
        }
        #expect(warned == commands.count - 1)
    }

    /// An image whose lazy refcounts were not written back: qemu-img repairs it at open; simg
    /// refuses (its store trusts the refcounts on disk) and writes nothing.
    @Test func dirtyImageIsRefusedUntouched() throws {
        let dir = try TempDir()
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lz.qcow2", "4M")
        try qemuImg(in: dir.path, "bitmap", "--add", "lz.qcow2", "b")
        _ = try run("qemu-io", ["-c", "write 0 64k", "-c", "sigraise 9", "lz.qcow2"], in: dir.path)
        let before = try Data(contentsOf: URL(fileURLWithPath: dir.file("lz.qcow2")))
        let r = try simg(in: dir.path, "bitmap", "--add", "lz.qcow2", "c")
        #expect(r.status == 1 && r.stderr.hasPrefix("simg: Could not open 'lz.qcow2': the image is marked dirty"), "\(r.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir.file("lz.qcow2"))) == before)
    }

    /// A bitmap on an image of size 0: qemu-img accepts the add but cannot store it (it prints
    /// "Lost persistent bitmaps ...: No memory" and exits 0); simg refuses it, and both leave
    /// the image without bitmaps.
    @Test func emptyImageGetsNoBitmap() throws {
        let dir = try TempDir()
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "z.qcow2", "0")
        let r = try simg(in: dir.path, "bitmap", "--add", "z.qcow2", "x")
        #expect(r.status == 1 && r.stderr == "simg: Operation add on bitmap x failed: Can't make bitmap 'x' persistent in 'z.qcow2': An image of size 0 cannot hold a bitmap\n", "\(r.stderr)")
        #expect(try Self.bitmaps(dir.file("z.qcow2")) == "")
        let check = try qemuImgResult(["check", dir.file("z.qcow2")])
        #expect(check.status == 0, "\(check.stdout)")
    }

    /// A malformed bitmap directory: refused as qemu-img refuses it, before anything is written.
    @Test func malformedDirectoryIsRefusedUntouched() throws {
        let dir = try TempDir()
        try Self.makeImages(dir)
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.file("a.qcow2"))))
        // The bitmaps extension (after the 112-byte header), then its directory.
        var p = Int(bytes[100]) << 24 | Int(bytes[101]) << 16 | Int(bytes[102]) << 8 | Int(bytes[103])
        func be(_ at: Int, _ n: Int) -> Int { (0..<n).reduce(0) { $0 << 8 | Int(bytes[at + $1]) } }
        var directory = 0, extensionAt = 0
        while be(p, 4) != 0 {
            if be(p, 4) == 0x2385_2875 { extensionAt = p; directory = be(p + 24, 8); break }
            p += 8 + (be(p + 4, 4) + 7) & ~7
        }
        try #require(directory != 0)
        let patches: [(String, [(Int, [UInt8])])] = [
            ("extra-data", [(directory + 23, [8])]), ("type", [(directory + 16, [2])]),
            ("granularity", [(directory + 17, [40])]), ("flags", [(directory + 15, [4])]),
            ("name-size", [(directory + 18, [0x0b, 0xb8])]), ("count", [(extensionAt + 11, [3])]),
            ("table-entry", [(be(directory, 8) + 7, [2])]),
        ]
        for (name, patch) in patches {
            var damaged = bytes
            for (at, value) in patch { damaged.replaceSubrange(at..<(at + value.count), with: value) }
            try Data(damaged).write(to: URL(fileURLWithPath: dir.file("h.qcow2")))
            for args in [["--add", "IMG", "x"], ["--remove", "IMG", "b1"], ["--merge", "b1", "IMG", "b2"]] {
                try Self.same(args, dir, image: "h.qcow2")
                let after = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.file("simg/h.qcow2"))))
                #expect(after == damaged, "\(name) \(args): simg wrote to the image")
            }
            let info = try simg(in: dir.path, "info", "h.qcow2")
            let qemu = try qemuImgResult(in: dir.path, ["info", "h.qcow2"])
            #expect(info.status == qemu.status && info.stderr == Self.qemuWords(qemu.stderr, image: "h.qcow2"), "\(name): info")
        }
    }
}

/// SIGKILL during `simg bitmap --add`, `--remove` and `--merge` (at write boundaries, and a few
/// random moments): `qemu-img check` finds no corruption, and the bitmaps are the old ones or
/// the new ones, bits included.
@Suite("Bitmap crash consistency", .serialized)
struct BitmapCrashTests {
    func drive(_ name: String, _ action: [String], target: String = "b2", seed: UInt64, bits: String? = nil) throws {
        let dir = try TempDir()
        try BitmapInteropTests.makeImages(dir)
        let pristine = dir.file("a.qcow2"), image = dir.file("img.qcow2")
        let before = try BitmapInteropTests.bitmaps(pristine)
        let bitsBefore = try bits.map { try BitmapInteropTests.dirtyMap(pristine, $0) }
        // The outcome of an uninterrupted run, to judge the killed ones by.
        try copySparse(pristine, image)
        _ = try runOK(simgBinary, ["bitmap"] + action + [image, target])
        let after = try BitmapInteropTests.bitmaps(image)
        let bitsAfter = try bits.map { try BitmapInteropTests.dirtyMap(image, $0) }
        #expect(after != before, "\(name): the action changed nothing")
        let figures = try crashDrive(name: name, kills: 2, seed: seed, arguments: ["bitmap"] + action + [image, target],
                                     prepare: {
                                         try? FileManager.default.removeItem(atPath: image)
                                         try copySparse(pristine, image)
                                     },
                                     verify: { _ in
                                         guard try crashQemuCheckClean(image, context: name) else { return false }
                                         let now = try BitmapInteropTests.bitmaps(image)
                                         guard now == before || now == after else {
                                             Issue.record("\(name): bitmaps \(now)")
                                             return false
                                         }
                                         if let bits {
                                             let map = try BitmapInteropTests.dirtyMap(image, bits)
                                             guard map == (now == before ? bitsBefore : bitsAfter) else {
                                                 Issue.record("\(name): bits of \(bits) are neither old nor new: \(map)")
                                                 return false
                                             }
                                         }
                                         return true
                                     })
        print("crash figures: \(figures.summary)")
    }

    @Test func killedAdd() throws { try drive("bitmap --add", ["--add", "-g", "4k"], target: "n", seed: 41) }
    @Test func killedRemove() throws { try drive("bitmap --remove", ["--remove"], seed: 42) }
    @Test func killedMerge() throws { try drive("bitmap --merge", ["--merge", "b1", "--enable"], seed: 43, bits: "b2") }
}
