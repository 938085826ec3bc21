import Foundation
import Glibc
import Testing
import TestSupport

/// Backing chains that loop or go absurdly deep, and backing names too long: made cheaply by
/// patching the name in one tiny qemu-img overlay (512-byte clusters, 1.75 KiB per file).
/// `info` without --backing-chain reads the header only (as qemu-img does) and succeeds;
/// `info --backing-chain`, `check` and `convert` open the chain and must exit 1 naming the
/// file, within a second and bounded memory. qemu-img is not run on these: it hangs on loops
/// and takes over ten seconds on a chain of 1,100 images.
@Suite struct HostileImageBackingTests {
    /// Writes an overlay at `dir/name` whose backing file is `backing` (a qcow2 name of exactly
    /// 11 characters, relative to the folder).
    static func overlay(_ dir: TempDir, _ name: String, backing: String) throws {
        var b = try HostileTemplates.shared.get()["overlay"]
        let offset = Int(hostileBE64(b, HostileField.backingFileOffset))
        precondition(backing.utf8.count == 11 && hostileBE32(b, HostileField.backingFileSize) == 11)
        hostilePut(&b, offset, Array(backing.utf8))
        try Data(b).write(to: URL(fileURLWithPath: dir.file(name)))
    }

    /// A chain c0000 -> c0001 -> ... -> c<levels> (a plain image): `levels` backing links.
    static func chain(_ dir: TempDir, levels: Int) throws {
        for i in 0..<levels {
            try overlay(dir, String(format: "c%04d.qcow2", i), backing: String(format: "c%04d.qcow2", i + 1))
        }
        try Data(try HostileTemplates.shared.get()["leaf"])
            .write(to: URL(fileURLWithPath: dir.file(String(format: "c%04d.qcow2", levels))))
    }

    /// Runs the four commands on `image`. `info` must succeed; the others must exit 1 with
    /// `expected` in the message (which names `image`).
    static func expectChainRefused(_ image: String, _ expected: String,
                                   sourceLocation: SourceLocation = #_sourceLocation) throws {
        let dir = try TempDir()
        let info = try hostileRun(["info", image])
        hostileExpectBounded(info, "info \(image)", sourceLocation: sourceLocation)
        #expect(info.status == 0, "info reads the header only: \(info)", sourceLocation: sourceLocation)
        for args in [["info", "--backing-chain", image], ["info", "--backing-chain", "--output=json", image],
                     ["check", image], ["convert", "-O", "raw", image, dir.file("out.raw")]] {
            let r = try hostileRun(args)
            hostileExpectBounded(r, args.joined(separator: " "), sourceLocation: sourceLocation)
            #expect(r.status == 1, "\(args): \(r)", sourceLocation: sourceLocation)
            #expect(r.stderr.contains(image) && r.stderr.contains(expected), "\(args): \(r)",
                    sourceLocation: sourceLocation)
        }
    }

    @Test func selfLoop() throws {
        let dir = try TempDir()
        try Self.overlay(dir, "self0.qcow2", backing: "self0.qcow2")
        try Self.expectChainRefused(dir.file("self0.qcow2"), "loops back")
    }

    @Test func twoImageLoop() throws {
        let dir = try TempDir()
        try Self.overlay(dir, "loopA.qcow2", backing: "loopB.qcow2")
        try Self.overlay(dir, "loopB.qcow2", backing: "loopA.qcow2")
        try Self.expectChainRefused(dir.file("loopA.qcow2"), "loops back")
    }

    /// top -> a -> b -> a: the loop starts below the top image.
    @Test func loopBelowTheTop() throws {
        let dir = try TempDir()
        try Self.overlay(dir, "top.qcow2", backing: "loopA.qcow2")
        try Self.overlay(dir, "loopA.qcow2", backing: "loopB.qcow2")
        try Self.overlay(dir, "loopB.qcow2", backing: "loopA.qcow2")
        try Self.expectChainRefused(dir.file("top.qcow2"), "loops back")
    }

    /// A loop through a symbolic link to the top image (same file, other name).
    @Test func loopThroughSymlink() throws {
        let dir = try TempDir()
        try Self.overlay(dir, "linkA.qcow2", backing: "linkB.qcow2")
        try FileManager.default.createSymbolicLink(atPath: dir.file("linkB.qcow2"), withDestinationPath: "linkA.qcow2")
        try Self.expectChainRefused(dir.file("linkA.qcow2"), "loops back")
    }

    /// 1,100 levels: refused past 1,000 (ImageOpener.maxChainDepth), quickly.
    @Test func chainOf1100Levels() throws {
        let dir = try TempDir()
        try Self.chain(dir, levels: 1100)
        try Self.expectChainRefused(dir.file("c0000.qcow2"), "deeper than 1000")
    }

    /// Exactly 1,000 levels is still a chain simg reads (as qemu-img does), within the bounds.
    @Test func chainOf1000LevelsIsRead() throws {
        let dir = try TempDir()
        try Self.chain(dir, levels: 1000)
        let image = dir.file("c0000.qcow2")
        for args in [["info", "--backing-chain", image], ["check", image],
                     ["convert", "-O", "raw", image, dir.file("out.raw")]] {
            let r = try hostileRun(args)
            hostileExpectBounded(r, args.joined(separator: " "))
            #expect(r.status == 0, "\(args): \(r)")
        }
    }

    /// Backing names of 1,023 bytes (the longest the header allows, but no file system takes
    /// a 1,023-byte file name) and of 1,024 and 4,000 bytes (refused by the header's limit).
    @Test(arguments: [1023, 1024, 4000])
    func longBackingName(_ length: Int) throws {
        let dir = try TempDir()
        var b = try HostileTemplates.shared.get()["64k"]
        hostilePut64(&b, HostileField.backingFileOffset, 0x1000)
        hostilePut32(&b, HostileField.backingFileSize, UInt32(length))
        hostilePut(&b, 0x1000, [UInt8](repeating: UInt8(ascii: "a"), count: length))
        let image = dir.file("long.qcow2")
        try Data(b).write(to: URL(fileURLWithPath: image))
        let info = try hostileRun(["info", image])
        hostileExpectBounded(info, "info")
        let q = try hostileQemuImg(["info", image])
        #expect(info.status == q.status, "info: \(info) vs qemu-img \(q.status)")
        if length > 1023 {
            #expect(info.status == 1 && info.stderr.contains(image) && info.stderr.contains("too long"), "\(info)")
        }
        for args in [["info", "--backing-chain", image], ["check", image], ["convert", "-O", "raw", image, dir.file("o")]] {
            let r = try hostileRun(args)
            hostileExpectBounded(r, args.joined(separator: " "))
            #expect(r.status == 1, "\(args): \(r)")
            // The failing file: the image itself, or (1,023) the backing file it names.
            #expect(r.stderr.contains(length > 1023 ? image : dir.file("aaaa")), "\(args): \(r)")
            let q = try hostileQemuImg(args)
            #expect(q.status == 1, "\(args): qemu-img exits \(q.status)")
        }
    }

    /// A FIFO as backing file or as the image: open(2) would wait for a writer forever (qemu-img
    /// hangs on both); simg refuses it at once. Not compared with qemu-img for that reason.
    @Test func fifoIsRefused() throws {
        let dir = try TempDir()
        #expect(mkfifo(dir.file("fifo0.qcow2"), 0o644) == 0)
        try Self.overlay(dir, "top.qcow2", backing: "fifo0.qcow2")
        for args in [["info", "--backing-chain", dir.file("top.qcow2")], ["check", dir.file("top.qcow2")],
                     ["convert", "-O", "raw", dir.file("top.qcow2"), dir.file("o")],
                     ["info", dir.file("fifo0.qcow2")], ["convert", "-O", "raw", dir.file("fifo0.qcow2"), dir.file("o")]] {
            let r = try hostileRun(args)
            hostileExpectBounded(r, args.joined(separator: " "))
            #expect(r.status == 1 && r.stderr.contains(dir.file("fifo0.qcow2")), "\(args): \(r)")
        }
    }

    /// A backing file that is a directory, or missing.
    @Test(arguments: ["dir00.qcow2", "gone0.qcow2"])
    func backingNotAnImage(_ name: String) throws {
        let dir = try TempDir()
        if name.hasPrefix("dir") { try FileManager.default.createDirectory(atPath: dir.file(name), withIntermediateDirectories: false) }
        try Self.overlay(dir, "top.qcow2", backing: name)
        for args in [["check", dir.file("top.qcow2")], ["convert", "-O", "raw", dir.file("top.qcow2"), dir.file("o")]] {
            let r = try hostileRun(args)
            hostileExpectBounded(r, args.joined(separator: " "))
            let q = try hostileQemuImg(args)
            #expect(r.status == 1 && q.status == 1, "\(args): \(r); qemu-img \(q.status)")
            #expect(r.stderr.contains(dir.file(name)), "\(args): \(r)")
        }
    }
}
