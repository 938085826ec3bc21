import Foundation
import Glibc
import Testing
import TestSupport

/// `snapshot -a` of a snapshot taken at another size: qemu-img 7.2 truncates the image to the
/// snapshot's size, then loads it. The result must match qemu-img's (size, map, content,
/// check), and the size change is part of the one header switch: SIGINT at any sync leaves the
/// current image or the applied one.
@Suite struct SnapshotApplyResizeTests {
    /// The snapshot at 4 MiB; the image then grown to 16 MiB or shrunk to 2 MiB and written.
    static func image(_ path: String, resized: [String]) throws {
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "4M")
        _ = try qemuIO("-c", "write -P 1 0 1M", "-c", "write -P 2 3M 1M", path)
        _ = try qemuImg("snapshot", "-c", "s1", path)
        _ = try runOK("qemu-img", ["resize", "-q"] + resized.dropLast() + [path, resized.last!])
        _ = try qemuIO("-c", "write -P 3 1M 1M", path)
    }

    @Test(arguments: [["16M"], ["--shrink", "2M"]])
    func applyMatchesQemuImg(_ resized: [String]) throws {
        let dir = try TempDir()
        let ours = dir.file("ours.qcow2"), theirs = dir.file("theirs.qcow2")
        try Self.image(theirs, resized: resized)
        try copySparse(theirs, ours)
        _ = try qemuImg("snapshot", "-a", "s1", theirs)
        let r = try simg(["snapshot", "-a", "s1", ours])
        #expect(r.status == 0 && r.stderr.isEmpty && r.stdout.isEmpty, "\(r.status): \(r.stderr)")
        #expect(try metaVirtualSize(ours) == 4 << 20)
        #expect(try metaVirtualSize(ours) == metaVirtualSize(theirs))
        let check = try qemuImgResult(["check", ours])
        #expect(check.status == 0, "\(check.stdout)")
        #expect(try qemuImg("map", "--output=json", ours).stdout == qemuImg("map", "--output=json", theirs).stdout)
        let compare = try qemuImgResult(["compare", ours, theirs])
        #expect(compare.status == 0, "\(compare.stdout)")
        #expect(try metaSnapshotNames(ours) == ["s1"])
    }

    @Test func applyWithResizeInterruptedAtEverySync() throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), applied = dir.file("applied.qcow2")
        try Self.image(pristine, resized: ["16M"])
        try copySparse(pristine, applied)
        _ = try qemuImg("snapshot", "-a", "s1", applied)
        let old = try crashGuestBytes(pristine, dir), new = try crashGuestBytes(applied, dir)
        try metaSweepSyncs(dir, pristine: pristine, arguments: ["snapshot", "-a", "s1"], image: "x.qcow2") { image, stderr in
            let content = try crashGuestBytes(image, dir)
            if stderr.contains("is unchanged") {
                #expect(content == old, "said unchanged: \(stderr)")
            } else {
                #expect(content == new, "\(stderr)")
            }
        }
    }
}
