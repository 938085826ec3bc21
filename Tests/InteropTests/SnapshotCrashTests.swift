import Foundation
import Testing
import TestSupport

/// SIGKILL during `simg snapshot -c` and `-d` (at random moments and at write boundaries):
/// `qemu-img check` never finds corruption (not even a COPIED flag out of step with a refcount),
/// the snapshot exists or not (the other snapshots untouched), the active layer reads the same.
@Suite("Snapshot crash consistency", .serialized)
struct SnapshotCrashTests {
    /// A 1 GiB image, metadata preallocated (2 L2 tables, every entry a cluster; small, as the
    /// copy before every kill is not sparse), with data in a few places and two snapshots taken
    /// by qemu-img.
    static func makeImage(_ dir: TempDir) throws -> String {
        let pristine = dir.file("pristine.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", pristine, "1G")
        _ = try qemuIO("-c", "write -P 1 0 1M", "-c", "write -P 2 700M 64k", pristine)
        _ = try qemuImg("snapshot", "-c", "s1", pristine)
        _ = try qemuIO("-c", "write -P 3 0 64k", "-c", "write -P 4 600M 1M", pristine)
        _ = try qemuImg("snapshot", "-c", "s2", pristine)
        _ = try qemuIO("-c", "write -P 5 900M 64k", pristine)
        return pristine
    }

    static func names(_ image: String) throws -> [String] {
        let info = try jsonObject(try qemuImg("info", "-U", "--output=json", image).stdout)
        return ((info["snapshots"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }
    }

    func drive(_ name: String, _ action: [String], before: [String], after: [String], seed: UInt64) throws {
        let dir = try TempDir()
        let pristine = try Self.makeImage(dir)
        let image = dir.file("img.qcow2")
        let figures = try crashDrive(name: name, kills: 6, seed: seed, arguments: ["snapshot"] + action + [image],
                                     prepare: {
                                         try? FileManager.default.removeItem(atPath: image)
                                         try copySparse(pristine, image)
                                     },
                                     verify: { _ in
                                         guard try crashQemuCheckClean(image, context: name) else { return false }
                                         let now = try Self.names(image)
                                         guard now == before || now == after else {
                                             Issue.record("\(name): snapshots \(now)")
                                             return false
                                         }
                                         let same = try qemuImgResult(["compare", "-U", image, pristine]).status == 0
                                         if !same { Issue.record("\(name): the active layer changed") }
                                         return same
                                     })
        print("crash figures: \(figures.summary)")
    }

    @Test func killedCreate() throws {
        try drive("snapshot -c", ["-c", "s3"], before: ["s1", "s2"], after: ["s1", "s2", "s3"], seed: 31)
    }

    @Test func killedDelete() throws {
        try drive("snapshot -d", ["-d", "s1"], before: ["s1", "s2"], after: ["s2"], seed: 32)
    }
}
