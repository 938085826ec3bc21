import Foundation
import Glibc
import Testing
import TestSupport

/// SIGINT and a full disk during `amend` and `bitmap`, as MetadataInterruptTests does for
/// resize, snapshot and commit: SIGINT delivered at every fdatasync (death by SIGINT, at most
/// one line naming the image, an image `qemu-img check` does not call corrupt, with the old or
/// the new state), and a file-size limit at the image's size (exit 1, the file and offset
/// named, the image as before).
@Suite struct AmendBitmapFaultTests {
    /// 4 MiB with data, a snapshot and more data: a refcount rebuild has blocks shared by two
    /// L1 tables to carry over; a bitmap with the first write recorded in it.
    func pristine(_ dir: TempDir, bitmap: Bool = false) throws -> String {
        let image = try metaSnapshotImage(dir)
        if bitmap {
            _ = try qemuImg("bitmap", "--add", image, "b0")
            _ = try qemuIO("-c", "write -P 7 0 64k", image)
        }
        return image
    }

    func refcountBits(_ image: String) throws -> Int {
        let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
        let data = ((info["format-specific"] as? [String: Any])?["data"] as? [String: Any]) ?? [:]
        return (data["refcount-bits"] as? NSNumber)?.intValue ?? -1
    }

    func bitmapNames(_ image: String) throws -> [String] {
        let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
        let data = ((info["format-specific"] as? [String: Any])?["data"] as? [String: Any]) ?? [:]
        return (data["bitmaps"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
    }

    @Test func amendRefcountWidthInterruptedAtEverySync() throws {
        let dir = try TempDir()
        let pristine = try pristine(dir, bitmap: true)
        let old = try crashGuestBytes(pristine, dir)
        try metaSweepSyncs(dir, pristine: pristine, arguments: ["amend", "-o", "refcount_bits=64"],
                           image: "x.qcow2") { image, stderr in
            #expect(try crashGuestBytes(image, dir) == old, "\(stderr)")
            #expect(try metaSnapshotNames(image) == ["s1"])
            // The rebuild keeps the bitmap's clusters counted: it stays listed either way.
            #expect(try bitmapNames(image) == ["b0"], "\(stderr)")
            let bits = try refcountBits(image)
            if stderr.contains("keeps its old refcount width") { #expect(bits == 16, "\(stderr)") }
            if stderr.contains("has the new refcount width") { #expect(bits == 64, "\(stderr)") }
            #expect(bits == 16 || bits == 64, "\(stderr)")
        }
    }

    @Test(arguments: [["--add", "b1"], ["--remove", "b0"], ["--add", "--merge", "b0", "b1"]])
    func bitmapInterruptedAtEverySync(_ tail: [String]) throws {
        let dir = try TempDir()
        let pristine = try pristine(dir, bitmap: true)
        let old = try crashGuestBytes(pristine, dir)
        let before = try bitmapNames(pristine)
        let after: [String] = tail[0] == "--remove" ? [] : ["b0", "b1"]
        try metaSweepSyncs(dir, pristine: pristine, arguments: ["bitmap"] + tail.dropLast(), image: "x.qcow2",
                           trailing: [tail.last!]) { image, stderr in
            #expect(try crashGuestBytes(image, dir) == old, "\(stderr)")
            let names = try bitmapNames(image)
            #expect(names == before || names == after, "\(tail): \(names): \(stderr)")
            if stderr.contains("keeps its bitmaps as they were") { #expect(names == before, "\(stderr)") }
            if stderr.contains("has its new bitmaps") { #expect(names == after, "\(stderr)") }
        }
    }

    /// The new size's tables (amend's size goes through resize) and a new bitmap's directory
    /// do not fit under a limit at the image's size. (A refcount rebuild of an image this
    /// small fits in its free clusters; its interruption is tested above.)
    @Test(arguments: [false, true])
    func fileSizeLimitDuringAmendAndBitmap(_ bitmap: Bool) throws {
        let dir = try TempDir()
        let pristine = try pristine(dir, bitmap: bitmap)
        let old = try crashGuestBytes(pristine, dir)
        let names = try bitmapNames(pristine)
        let size = signalFileSize(pristine)
        let arguments: [String] = bitmap ? ["bitmap", "--add", "IMAGE", "b1"] : ["amend", "-o", "size=1G", "IMAGE"]
        let image = dir.file("x.qcow2")
        try copySparse(pristine, image)
        let r = try run("prlimit", ["--fsize=\(size)", simgBinary] + arguments.map { $0 == "IMAGE" ? image : $0 })
        faultExpectWriteError(r, file: image, reason: "File too large")
        try signalExpectNotCorrupt(image)
        #expect(try crashGuestBytes(image, dir) == old, "\(arguments): content changed")
        #expect(try metaVirtualSize(image) == old.count, "\(arguments)")
        #expect(try bitmapNames(image) == names, "\(arguments)")
    }
}
