import Foundation
import Testing
import TestSupport

/// Persistent dirty bitmaps kept through every command that writes a qcow2, as qemu-img 7.2
/// keeps them: simg and qemu-img run the same command on copies of the same images, and give
/// the same exit status, messages and bitmap lists (`qemu-img info`), a clean `qemu-img check`,
/// and the same bits (read through qemu-nbd by nbdinfo): enabled bitmaps dirty where the
/// command wrote, disabled ones unchanged, resized with the image.
@Suite("Bitmaps kept by writing commands")
struct BitmapKeepTests {
    /// Runs `setup` in a fresh folder, copies it for each tool, runs `arguments` (the command
    /// and its arguments, relative names) in each copy, and compares `images` afterwards.
    static func same(_ arguments: [String], images: [String], sourceLocation: SourceLocation = #_sourceLocation,
                     setup: (TempDir) throws -> Void) throws {
        let dir = try TempDir(), orig = try TempDir()
        try setup(orig)
        for side in ["simg", "qemu"] { try FileManager.default.copyItem(atPath: orig.path, toPath: dir.file(side)) }
        let s = try run(simgBinary, arguments, in: dir.file("simg"))
        let q = try run("qemu-img", arguments, in: dir.file("qemu"))
        #expect(s.status == q.status, "\(arguments): simg \(s.status) \(s.stderr), qemu-img \(q.status) \(q.stderr)",
                sourceLocation: sourceLocation)
        #expect(s.stderr == BitmapInteropTests.qemuWords(q.stderr, image: ""), "\(arguments)", sourceLocation: sourceLocation)
        #expect(s.stdout == q.stdout, "\(arguments)", sourceLocation: sourceLocation)
        for image in images {
            let simgImage = dir.file("simg/" + image), qemuImage = dir.file("qemu/" + image)
            let list = try BitmapInteropTests.bitmaps(qemuImage)
            #expect(try BitmapInteropTests.bitmaps(simgImage) == list, "\(arguments): \(image)", sourceLocation: sourceLocation)
            let check = try qemuImgResult(["check", simgImage])
            #expect(check.status == 0, "\(arguments): \(image): \(check.stdout)", sourceLocation: sourceLocation)
            for name in try names(qemuImage, consistentOnly: true) {
                #expect(try BitmapInteropTests.dirtyMap(simgImage, name) == BitmapInteropTests.dirtyMap(qemuImage, name),
                        "\(arguments): bits of \(name) in \(image)", sourceLocation: sourceLocation)
            }
        }
    }

    /// The bitmaps of an image (`consistentOnly`: not in use).
    static func names(_ path: String, consistentOnly: Bool = false) throws -> [String] {
        let info = try jsonObject(try qemuImg("info", "-U", "--output=json", path).stdout)
        let data = (info["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        return ((data?["bitmaps"] as? [[String: Any]]) ?? []).compactMap { bitmap in
            if consistentOnly && ((bitmap["flags"] as? [String]) ?? []).contains("in-use") { return nil }
            return bitmap["name"] as? String
        }
    }

    /// a.qcow2 (4 MiB): b1 enabled (64k), b2 disabled (512 bytes), data qemu-io wrote and both
    /// dirty from it; with `snapshot`, an internal snapshot s1.
    static func bitmapImage(_ dir: TempDir, snapshot: Bool = false) throws {
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "a.qcow2", "4M")
        try qemuImg(in: dir.path, "bitmap", "--add", "a.qcow2", "b1")
        try qemuImg(in: dir.path, "bitmap", "--add", "-g", "512", "a.qcow2", "b2")
        try qemuIO(in: dir.path, "-c", "write 0 64k", "-c", "write 4000k 96k", "a.qcow2")
        try qemuImg(in: dir.path, "bitmap", "--disable", "a.qcow2", "b2")
        if snapshot { try qemuImg(in: dir.path, "snapshot", "-c", "s1", "a.qcow2") }
    }

    /// Leaves every bitmap of `image` in use, as a killed qemu-io does.
    static func leaveInUse(_ dir: TempDir, _ image: String) throws {
        _ = try run("qemu-io", ["-c", "sigraise 9", image], in: dir.path)
        #expect(try qemuImg("info", "-U", dir.file(image)).stdout.contains("in-use"))
    }

    /// base.qcow2 (16 MiB, or `baseSize`): b0 enabled, bd disabled, bg enabled at 1 MiB; its
    /// overlay top.qcow2 (16 MiB): t0 enabled, data, zeros and a discard over the base.
    static func commitChain(_ dir: TempDir, baseSize: String = "16M") throws {
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "base.qcow2", baseSize)
        try qemuImg(in: dir.path, "bitmap", "--add", "base.qcow2", "b0")
        try qemuImg(in: dir.path, "bitmap", "--add", "--disable", "base.qcow2", "bd")
        try qemuImg(in: dir.path, "bitmap", "--add", "-g", "1M", "base.qcow2", "bg")
        try qemuIO(in: dir.path, "-c", "write -P 7 0 3M", "base.qcow2")
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "16M")
        try qemuImg(in: dir.path, "bitmap", "--add", "top.qcow2", "t0")
        try qemuIO(in: dir.path, "-c", "write 1M 1M", "-c", "write -z 8M 1M", "-c", "write 12300k 4k",
                   "-c", "discard 0 64k", "top.qcow2")
    }

    @Test func commit() throws {
        try Self.same(["commit", "top.qcow2"], images: ["base.qcow2", "top.qcow2"]) { try Self.commitChain($0) }
        // A base smaller than the top grows first: its bitmaps with it.
        try Self.same(["commit", "top.qcow2"], images: ["base.qcow2", "top.qcow2"]) { try Self.commitChain($0, baseSize: "4M") }
        try Self.same(["commit", "-d", "top.qcow2"], images: ["base.qcow2", "top.qcow2"]) { try Self.commitChain($0) }
    }

    @Test func resize() throws {
        for args in [["8M"], ["--shrink", "2M"], ["5000192"], ["4M"], ["5000000"],
                     ["--preallocation=falloc", "8M"], ["--preallocation=full", "6M"]] {
            try Self.same(["resize", "a.qcow2"] + args, images: ["a.qcow2"]) { try Self.bitmapImage($0) }
        }
        // Grown over a larger backing file: the new area is zeroed, and still clean.
        try Self.same(["resize", "o.qcow2", "8M"], images: ["o.qcow2"]) { dir in
            try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "b.qcow2", "8M")
            try qemuIO(in: dir.path, "-c", "write -P 1 0 8M", "b.qcow2")
            try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2", "4M")
            try qemuImg(in: dir.path, "bitmap", "--add", "o.qcow2", "x")
            try qemuIO(in: dir.path, "-c", "write 1M 4k", "o.qcow2")
        }
        // In-use bitmaps: QEMU refuses (after checking the size).
        for args in [["8M"], ["--shrink", "2M"], ["5000000"]] {
            try Self.same(["resize", "a.qcow2"] + args, images: ["a.qcow2"]) {
                try Self.bitmapImage($0)
                try Self.leaveInUse($0, "a.qcow2")
            }
        }
    }

    /// amend's size goes through resize: the bitmaps follow it.
    @Test func amendSize() throws {
        for size in ["8M", "2M"] {
            try Self.same(["amend", "-o", "size=\(size)", "a.qcow2"], images: ["a.qcow2"]) { try Self.bitmapImage($0) }
        }
    }

    @Test func snapshot() throws {
        try Self.same(["snapshot", "-c", "s2", "a.qcow2"], images: ["a.qcow2"]) { try Self.bitmapImage($0, snapshot: true) }
        try Self.same(["snapshot", "-d", "s1", "a.qcow2"], images: ["a.qcow2"]) { try Self.bitmapImage($0, snapshot: true) }
        // Applying is refused while the image has any bitmap: enabled, disabled or in use.
        for name in ["s1", "nope"] {
            try Self.same(["snapshot", "-a", name, "a.qcow2"], images: ["a.qcow2"]) { try Self.bitmapImage($0, snapshot: true) }
        }
        try Self.same(["snapshot", "-a", "s1", "a.qcow2"], images: ["a.qcow2"]) {
            try Self.bitmapImage($0, snapshot: true)
            try qemuImg(in: $0.path, "bitmap", "--disable", "a.qcow2", "b1")
        }
        try Self.same(["snapshot", "-a", "s1", "a.qcow2"], images: ["a.qcow2"]) {
            try Self.bitmapImage($0, snapshot: true)
            try Self.leaveInUse($0, "a.qcow2")
        }
    }

    @Test func rebase() throws {
        try Self.same(["rebase", "-b", "b2.qcow2", "-F", "qcow2", "ov.qcow2"], images: ["ov.qcow2"]) { dir in
            try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "b1.qcow2", "4M")
            try qemuIO(in: dir.path, "-c", "write -P 1 0 1M", "b1.qcow2")
            try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "b2.qcow2", "4M")
            try qemuIO(in: dir.path, "-c", "write -P 2 2M 64k", "b2.qcow2")
            try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "ov.qcow2")
            try qemuImg(in: dir.path, "bitmap", "--add", "ov.qcow2", "o1")
            try qemuImg(in: dir.path, "bitmap", "--add", "--disable", "ov.qcow2", "o2")
            try qemuIO(in: dir.path, "-c", "write -P 3 3M 8k", "ov.qcow2")
        }
    }

    @Test func convertIntoExisting() throws {
        // Plain, compressed, and through O_DIRECT (simg's direct writes, mapped after the data).
        for extra in [[], ["-c"], ["-t", "none"]] {
            try Self.same(["convert", "-n"] + extra + ["-f", "raw", "-O", "qcow2", "src.raw", "a.qcow2"], images: ["a.qcow2"]) { dir in
                try Self.bitmapImage(dir)
                try qemuImg(in: dir.path, "create", "-q", "-f", "raw", "src.raw", "4M")
                try qemuIO(in: dir.path, "-f", "raw", "-c", "write -P 3 1M 100k", "src.raw")
            }
        }
    }

    /// SIGKILL during a commit into a base with bitmaps: neither image corrupt, the top reading
    /// as before, and every bitmap of the base either in use (inconsistent, as QEMU leaves a
    /// killed writer's) or with the bits of before or after the commit, never others.
    @Test func killedCommit() throws {
        let dir = try TempDir()
        let pristine = try TempDir()
        try Self.commitChain(pristine)
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        func prepare() throws {
            for name in ["base.qcow2", "top.qcow2"] {
                try? FileManager.default.removeItem(atPath: dir.file(name))
                try copySparse(pristine.file(name), dir.file(name))
            }
        }
        func maps() throws -> [String: String] {
            var result: [String: String] = [:]
            for name in try Self.names(base, consistentOnly: true) { result[name] = try BitmapInteropTests.dirtyMap(base, name) }
            return result
        }
        try prepare()
        let before = try maps()
        let content = try crashGuestBytes(top, dir)
        _ = try runOK(simgBinary, ["commit", top])
        let after = try maps()
        #expect(before != after && after.count == 3)
        let verify: (Bool) throws -> Bool = { _ in
            guard try crashQemuCheckClean(top, context: "commit"), try crashQemuCheckClean(base, context: "commit") else { return false }
            guard crashSame(try crashGuestBytes(top, dir), content) else { return false }
            for (name, bits) in try maps() where bits != before[name] && bits != after[name] {
                Issue.record("bitmap \(name) of the base has bits neither of before nor after the commit: \(bits)")
                return false
            }
            return true
        }
        var figures = try crashDrive(name: "commit with bitmaps", kills: 4, seed: 71, arguments: ["commit", top],
                                     prepare: prepare, verify: verify)
        try crashSweep(&figures, arguments: ["commit", top], points: 8, prepare: prepare, verify: verify)
        print("crash figures: \(figures.summary)")
        #expect(figures.bad == 0)
    }
}
