import Foundation
import Testing
import TestSupport

/// `simg check` against `qemu-img check` on identical copies of clean and deliberately broken
/// images: same exit status, same stdout (human and JSON), same stderr lines; after a repair
/// the image checks the same in qemu-img and its content is unchanged.
@Suite struct CheckInteropTests {
    // MARK: - Editing images the way a bug or a crash would break them

    /// Direct access to a qcow2 file's metadata (big-endian fields).
    struct Editor {
        let path: String

        func u64(_ offset: UInt64) throws -> UInt64 {
            let h = try #require(FileHandle(forReadingAtPath: path))
            defer { try? h.close() }
            try h.seek(toOffset: offset)
            let d = try #require(try h.read(upToCount: 8))
            return d.reduce(0) { $0 << 8 | UInt64($1) }
        }

        func u32(_ offset: UInt64) throws -> UInt32 { UInt32(try u64(offset) >> 32) }

        func write(_ offset: UInt64, _ bytes: [UInt8]) throws {
            let h = try #require(FileHandle(forUpdatingAtPath: path))
            defer { try? h.close() }
            try h.seek(toOffset: offset)
            try h.write(contentsOf: Data(bytes))
        }

        func put64(_ offset: UInt64, _ v: UInt64) throws {
            try write(offset, (0..<8).map { UInt8(truncatingIfNeeded: v >> UInt64(56 - 8 * $0)) })
        }

        var clusterBits: UInt64 { get throws { UInt64(try u32(20)) } }
        var l1Offset: UInt64 { get throws { try u64(40) } }
        var reftableOffset: UInt64 { get throws { try u64(48) } }
        func l1Entry(_ i: UInt64) throws -> UInt64 { try u64(try l1Offset + 8 * i) }
        func l2Offset() throws -> UInt64 { try l1Entry(0) & 0x00ff_ffff_ffff_fe00 }
        func l2Entry(_ i: UInt64) throws -> UInt64 { try u64(try l2Offset() + 8 * i) }
        func setL2Entry(_ i: UInt64, _ v: UInt64) throws { try put64(try l2Offset() + 8 * i, v) }
        func dataCluster(_ i: UInt64) throws -> UInt64 { (try l2Entry(i) & 0x00ff_ffff_ffff_fe00) >> (try clusterBits) }

        /// Sets a 16-bit refcount in the first refcount block.
        func setRefcount(_ cluster: UInt64, _ value: UInt16) throws {
            let block = try u64(try reftableOffset)
            try write(block + 2 * cluster, [UInt8(value >> 8), UInt8(value & 0xff)])
        }

        func size() throws -> UInt64 {
            (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value ?? 0
        }
    }

    /// A 4 MiB image with three data clusters at 0 and one at 1 MiB.
    static func makeImage(_ path: String, options: String? = nil) throws {
        var args = ["create", "-q", "-f", "qcow2"]
        if let options { args += ["-o", options] }
        _ = try runOK("qemu-img", args + [path, "4M"])
        try qemuIO("-c", "write -P 1 0 192k", "-c", "write -P 2 1M 64k", path)
    }

    enum Damage: String, CaseIterable {
        case raisedRefcount, zeroRefcountOfUsedCluster, leakedCluster, l2EntryBeyondEOF,
             misalignedL2Entry, misalignedPreallocatedZero, clearedCopiedL2, clearedCopiedL1,
             zeroRefcountOfL2Table, refcountBlockCountedTwice, severalLeaksAndRaised,
             dirtyLazyRefcounts, refcountBlockOutsideImage, contradictingSubclusterBitmaps,
             raisedRefcountSharedWithSnapshot, corruptBitAndLeak, compressedWithCopiedFlag,
             snapshotL1Unaligned, snapshotL1BeyondEOF
    }

    static func damage(_ d: Damage, _ path: String) throws {
        let e = Editor(path: path)
        if d == .dirtyLazyRefcounts {
            try makeImage(path, options: "lazy_refcounts=on")
            // qemu-io aborts on purpose: a crash after the write, before the refcounts.
            _ = try run("qemu-io", ["-c", "write -P 3 2M 64k", "-c", "abort", path])
            return
        }
        switch d {
        case .contradictingSubclusterBitmaps:
            try makeImage(path, options: "extended_l2=on")
            // Entry 0: subclusters 0-1 both allocated and zero; entry 10: unallocated with a bit.
            try e.put64(try e.l2Offset() + 8, 0x0000_0003_0000_0003)
            try e.put64(try e.l2Offset() + 16 * 10 + 8, 1)
            return
        case .compressedWithCopiedFlag:
            let raw = path + ".raw"
            _ = try qemuImg("create", "-q", "-f", "raw", raw, "1M")
            _ = try qemuIO("-f", "raw", "-c", "write -P 5 0 256k", raw)
            _ = try qemuImg("convert", "-c", "-O", "qcow2", raw, path)
            try FileManager.default.removeItem(atPath: raw)
            try e.setL2Entry(1, try e.l2Entry(1) | (1 << 63))
            return
        default: break
        }
        try makeImage(path)
        switch d {
        case .raisedRefcount: try e.setRefcount(try e.dataCluster(0), 2)
        case .zeroRefcountOfUsedCluster: try e.setRefcount(try e.dataCluster(1), 0)
        case .leakedCluster:
            let end = try e.size()
            _ = try runOK("truncate", ["-s", String(end + 65536), path])
            try e.setRefcount(end >> 16, 1)
        case .l2EntryBeyondEOF:
            let entry = try e.l2Entry(2)
            try e.setL2Entry(2, (entry & ~0x00ff_ffff_ffff_fe00) | (100 << 20))
        case .misalignedL2Entry: try e.setL2Entry(1, try e.l2Entry(1) + 0x200)
        case .misalignedPreallocatedZero:
            try e.setL2Entry(5, ((try e.l2Entry(2) & 0x00ff_ffff_ffff_fe00) + 0x200) | 1 | (1 << 63))
        case .clearedCopiedL2: try e.setL2Entry(0, try e.l2Entry(0) & ~(UInt64(1) << 63))
        case .clearedCopiedL1: try e.put64(try e.l1Offset, try e.l1Entry(0) & ~(UInt64(1) << 63))
        case .zeroRefcountOfL2Table: try e.setRefcount(try e.l2Offset() >> 16, 0)
        case .refcountBlockCountedTwice: try e.setRefcount(try e.u64(try e.reftableOffset) >> 16, 2)
        case .severalLeaksAndRaised:
            let end = try e.size()
            _ = try runOK("truncate", ["-s", String(end + 3 * 65536), path])
            for k in 0..<UInt64(3) { try e.setRefcount((end >> 16) + k, 1) }
            try e.setRefcount(1, 5)
        case .refcountBlockOutsideImage: try e.put64(try e.reftableOffset + 8, 50 << 20)
        case .raisedRefcountSharedWithSnapshot:
            _ = try qemuImg("snapshot", "-c", "s1", path)
            try e.setRefcount(try e.dataCluster(0), 3)
        case .snapshotL1Unaligned, .snapshotL1BeyondEOF:
            _ = try qemuImg("snapshot", "-c", "s1", path)
            let table = try e.u64(64)
            try e.put64(table, d == .snapshotL1Unaligned ? try e.u64(table) + 0x200 : 1 << 30)
        case .corruptBitAndLeak:
            try e.put64(72, try e.u64(72) | 2)
            try e.setRefcount(1, 2)
        case .dirtyLazyRefcounts, .contradictingSubclusterBitmaps, .compressedWithCopiedFlag: break
        }
    }

    // MARK: - Comparing

    struct Outcome {
        var status: Int32
        var stdout: String
        var stderrLines: [String]
    }

    /// Runs `tool check ARGS img.qcow2` in `dir` (so the file name printed is the same).
    static func check(_ tool: String, in dir: String, _ args: [String], name: String = "img.qcow2") throws -> Outcome {
        let r = tool == "simg" ? try run(simgBinary, ["check"] + args + [name], in: dir)
                               : try qemuImgResult(in: dir, ["check"] + args + [name])
        let lines = r.stderr.split(separator: "\n").map {
            $0.hasPrefix("simg: ") ? "qemu-img: " + $0.dropFirst(6) : String($0)
        }
        return Outcome(status: r.status, stdout: r.stdout, stderrLines: lines.sorted())
    }

    /// Makes identical copies for qemu-img and simg, runs the same check on both and compares;
    /// after a repair compares how qemu-img sees both results and the guest content.
    /// `name` is how the commands name the copy (file: and json: names mean the same file).
    static func compare(_ source: String, _ args: [String], original content: String?,
                        name: String = "img.qcow2") throws {
        let work = try TempDir()
        let qDir = work.file("q"), sDir = work.file("s")
        for d in [qDir, sDir] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
            _ = try runOK("cp", ["--sparse=always", source, d + "/img.qcow2"])
        }
        let q = try check("qemu-img", in: qDir, args, name: name)
        let s = try check("simg", in: sDir, args, name: name)
        #expect(s.status == q.status, "\(args) \(source): exit status")
        #expect(s.stdout == q.stdout, "\(args) \(source): stdout")
        // qemu-img cannot repair some images simg can; its own failure lines are not compared then.
        if q.status != 1 || s.status == 1 {
            #expect(s.stderrLines == q.stderrLines, "\(args) \(source): stderr")
        }
        guard args.contains("-r") else { return }
        let qAfter = try check("qemu-img", in: qDir, [])
        let sAfter = try check("qemu-img", in: sDir, [])
        #expect(sAfter.status == qAfter.status || sAfter.status == 0, "\(args) \(source): qemu-img check after repair")
        #expect(sAfter.stdout == qAfter.stdout || sAfter.status == 0)
        if sAfter.status == 0 || qAfter.status == 0 {
            _ = try qemuImg("convert", "-O", "raw", sDir + "/img.qcow2", work.file("s.raw"))
            if let content {
                #expect(try filesEqual(content, work.file("s.raw")), "\(args) \(source): guest content changed")
            }
        }
    }

    static let modes: [[String]] = [[], ["--output=json"], ["-r", "leaks"], ["-r", "leaks", "--output=json"],
                                    ["-r", "all"], ["-r", "all", "--output=json"]]

    @Test(arguments: Damage.allCases)
    func brokenImagesMatchQemu(_ d: Damage) throws {
        let dir = try TempDir()
        let image = dir.file("broken.qcow2")
        try Self.damage(d, image)
        // The guest content before repair, where qemu-img can still read the image.
        var content: String? = dir.file("before.raw")
        if try qemuImgResult(["convert", "-O", "raw", image, dir.file("before.raw")]).status != 0 { content = nil }
        if d == .misalignedL2Entry || d == .misalignedPreallocatedZero || d == .l2EntryBeyondEOF { content = nil }
        for args in Self.modes { try Self.compare(image, args, original: content) }
        // Each of these really is broken: qemu-img does not call it clean.
        #expect(try qemuImgResult(["check", image]).status != 0)
    }

    /// Random damage to metadata words (refcount table and blocks, L1, L2) of several kinds
    /// of image; whatever qemu-img makes of it, simg must make the same.
    @Test(arguments: 1...16)
    func randomDamageMatchesQemu(seed: UInt64) throws {
        var generator = XorShift64Star(state: seed &* 0x9E37_79B9_7F4A_7C15)
        func next() -> UInt64 { generator.next() }
        let dir = try TempDir()
        let image = dir.file("img.qcow2")
        switch seed % 4 {
        case 0: try Self.makeImage(image)
        case 1: try Self.makeImage(image, options: "extended_l2=on")
        case 2:
            try Self.makeImage(image)
            _ = try qemuImg("snapshot", "-c", "s1", image)
            _ = try qemuIO("-c", "write -P 7 0 64k", image)
        default: try Self.makeImage(image, options: "refcount_bits=8")
        }
        let e = Editor(path: image)
        let size = try e.size()
        for _ in 0..<(1 + next() % 2) {
            let offset = (1 + next() % min(size / 65536 - 1, 5)) * 65536 + 8 * (next() % 64)
            var v = try e.u64(offset)
            switch next() % 4 {
            case 0: v ^= 1 << (next() % 64)
            case 1: v = next()
            case 2: v = (next() % (size / 512 + 4)) * 512 | (v & (3 << 62))
            default: v = 0
            }
            try e.put64(offset, v)
        }
        for args in Self.modes { try Self.compare(image, args, original: nil) }
    }

    @Test func repairedImagesAreCleanInQemu() throws {
        for d in [Damage.raisedRefcount, .zeroRefcountOfUsedCluster, .leakedCluster, .clearedCopiedL1,
                  .clearedCopiedL2, .zeroRefcountOfL2Table, .refcountBlockCountedTwice, .dirtyLazyRefcounts] {
            let dir = try TempDir()
            let image = dir.file("img.qcow2")
            try Self.damage(d, image)
            let before = try run(simgBinary, ["check", image])
            #expect(before.status == 2 || before.status == 3, "\(d)")
            let repair = try run(simgBinary, ["check", "-r", "all", image])
            #expect(repair.status == 0, "\(d): \(repair.stderr)")
            #expect(repair.stdout.contains("Double checking the fixed image now...\nNo errors were found on the image.\n"), "\(d)")
            let q = try qemuImgResult(["check", image])
            #expect(q.status == 0, "\(d): \(q.stderr)")
            #expect(q.stdout.hasPrefix("No errors were found on the image.\n"))
            if d == .dirtyLazyRefcounts {
                // The dirty bit (incompatible feature bit 0) is cleared.
                #expect(try Editor(path: image).u64(72) & 1 == 0)
            }
        }
    }

    @Test func cleanImagesMatchQemu() throws {
        let dir = try TempDir()
        var images: [String] = []
        func make(_ name: String, _ options: String?) throws {
            try Self.makeImage(dir.file(name), options: options)
            _ = try qemuIO("-c", "write -z 2M 128k", dir.file(name))
            images.append(dir.file(name))
        }
        try make("v2.qcow2", "compat=0.10")
        try make("c512.qcow2", "cluster_size=512")
        try make("c2m.qcow2", "cluster_size=2M")
        for bits in [1, 2, 4, 8, 32, 64] { try make("rb\(bits).qcow2", "refcount_bits=\(bits)") }
        try make("ext.qcow2", "extended_l2=on")
        _ = try qemuIO("-c", "write -P 3 8k 4k", dir.file("ext.qcow2"))
        try make("lazy.qcow2", "lazy_refcounts=on")
        try make("snap.qcow2", nil)
        _ = try qemuImg("snapshot", "-c", "s1", dir.file("snap.qcow2"))
        _ = try qemuIO("-c", "write -P 9 0 64k", dir.file("snap.qcow2"))
        _ = try qemuImg("snapshot", "-c", "s2", dir.file("snap.qcow2"))
        try make("bitmaps.qcow2", nil)
        _ = try qemuImg("bitmap", "--add", dir.file("bitmaps.qcow2"), "b0")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", dir.file("pm.qcow2"), "64M")
        images.append(dir.file("pm.qcow2"))
        _ = try qemuImg("create", "-q", "-f", "raw", dir.file("src.raw"), "2M")
        _ = try qemuIO("-f", "raw", "-c", "write -P 5 0 1M", dir.file("src.raw"))
        _ = try qemuImg("convert", "-c", "-O", "qcow2", dir.file("src.raw"), dir.file("comp.qcow2"))
        _ = try qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4k",
                        dir.file("src.raw"), dir.file("compz.qcow2"))
        images += [dir.file("comp.qcow2"), dir.file("compz.qcow2")]
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "data_file=\(dir.file("data.raw"))",
                        dir.file("df.qcow2"), "4M")
        _ = try qemuIO("-c", "write -P 1 0 192k", "-c", "write -z 1M 64k", dir.file("df.qcow2"))
        images.append(dir.file("df.qcow2"))
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", dir.file("v2.qcow2"), "-F", "qcow2", dir.file("top.qcow2"))
        _ = try qemuIO("-c", "write -P 7 64k 64k", dir.file("top.qcow2"))
        images.append(dir.file("top.qcow2"))
        for image in images {
            for args in [[], ["--output=json"]] {
                let s = try run(simgBinary, ["check"] + args + [image])
                let q = try qemuImgResult(["check"] + args + [image])
                #expect(s.status == 0 && q.status == 0, "\(image)")
                #expect(s.stdout == q.stdout, "\(image) \(args)")
                #expect(s.stderr == q.stderr, "\(image) \(args)")
            }
        }
    }

    @Test func rawHasNoCheck() throws {
        let dir = try TempDir()
        _ = try qemuImg("create", "-q", "-f", "raw", dir.file("r.img"), "1M")
        let s = try run(simgBinary, ["check", dir.file("r.img")])
        let q = try qemuImgResult(["check", dir.file("r.img")])
        #expect(q.status == 63)
        #expect(s.status == 63)
        #expect(s.stderr == "simg: This image format does not support checks\n")
        #expect(s.stdout == q.stdout)
    }

    @Test func openFailuresMatchQemu() throws {
        let dir = try TempDir()
        _ = try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-u", "-b", "nonexist.qcow2", "-F", "qcow2", "ov.qcow2", "1M")
        _ = try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-u", "-b", "ov.qcow2", "-F", "qcow2", "ov2.qcow2", "1M")
        try "garbage\n".write(toFile: dir.file("notq.qcow2"), atomically: true, encoding: .utf8)
        _ = try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-u", "-b", "notq.qcow2", "-F", "qcow2", "ov3.qcow2", "1M")
        _ = try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-o", "data_file=gone.raw", "df.qcow2", "1M")
        try FileManager.default.removeItem(atPath: dir.file("gone.raw"))
        for name in ["ov.qcow2", "ov2.qcow2", "ov3.qcow2", "df.qcow2"] {
            let s = try run(simgBinary, ["check", name], in: dir.path)
            let q = try qemuImgResult(in: dir.path, ["check", name])
            #expect(s.status == 1 && q.status == 1)
            #expect("qemu-img" + s.stderr.dropFirst(4) == q.stderr, "\(name)")
        }
    }

    @Test func usageErrorsMatchQemu() throws {
        let dir = try TempDir()
        try Self.makeImage(dir.file("a.qcow2"))
        for args in [["-r", "foo", "a.qcow2"], ["--output=x", "a.qcow2"], ["-T", "bogus", "a.qcow2"], [],
                     ["-q", "a.qcow2"], ["-T", "none", "-U", "a.qcow2"], ["missing.qcow2"]] {
            let s = try run(simgBinary, ["check"] + args, in: dir.path)
            let q = try qemuImgResult(in: dir.path, ["check"] + args)
            #expect(s.status == q.status, "\(args)")
            #expect(s.stdout == q.stdout, "\(args)")
            #expect(s.stderr.replacingOccurrences(of: "simg", with: "qemu-img") == q.stderr, "\(args)")
        }
    }

    /// check -r repairs the file it opened and locked, whatever the name leads to later:
    /// stopped (SIGSTOP from strace) at its first lock call on the image, the image is renamed
    /// away and another leaky copy put under its name; on SIGCONT the renamed file is repaired
    /// and the copy under the name is left byte for byte as it was.
    @Test func repairGoesToTheLockedFileAfterARename() throws {
        let dir = try TempDir()
        let image = dir.file("img")
        try Self.makeImage(image)
        try Self.damage(.leakedCluster, image)
        _ = try runOK("cp", [image, dir.file("leaky")])
        let script = """
            strace -f -o trace.txt -P "$PWD/img" -e trace=fcntl -e inject=fcntl:signal=STOP:when=1 \
                '\(simgBinary)' check -r leaks img > out.txt 2>&1 &
            tracer=$!
            for i in $(seq 1 400); do grep -q 'stopped by SIGSTOP' trace.txt 2>/dev/null && break; sleep 0.05; done
            pid=$(grep 'stopped by SIGSTOP' trace.txt | head -1 | cut -d' ' -f1)
            [ -n "$pid" ] || { kill $tracer; exit 9; }
            mv img moved && cp leaky img
            kill -CONT "$pid"
            wait $tracer
            """
        let r = try run("/bin/bash", ["-c", script], in: dir.path)
        #expect(r.status == 0, "\(r.stderr)")
        let out = (try? String(contentsOfFile: dir.file("out.txt"), encoding: .utf8)) ?? ""
        #expect(out.contains("Repairing cluster "), "\(out)")
        #expect(try qemuImgResult(["check", dir.file("moved")]).status == 0)
        #expect(try filesEqual(dir.file("img"), dir.file("leaky")))
        #expect(try qemuImgResult(["check", image]).status == 3)
    }
}
