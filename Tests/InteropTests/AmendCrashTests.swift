import Foundation
import Testing
import TestSupport

/// SIGKILL during `simg amend -o refcount_bits=N` (at random moments and at write boundaries;
/// the helpers are CrashConsistencyTests.swift's): the new table and blocks go into free
/// clusters and one header write switches to them, so `qemu-img check` never finds corruption
/// (leaks allowed), the width is the old or the new one, and the guest content is unchanged.
@Suite("Amend crash consistency", .serialized)
struct AmendCrashTests {
    @Test func killedRefcountRebuild() throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), image = dir.file("a.qcow2")
        // 4 KiB clusters: many refcount blocks at 64 bits (512 entries each).
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", pristine, "64M")
        var writes: [String] = []
        for k in 0..<64 { writes += ["-c", "write -P \(k + 1) \(k)M 256k"] }
        try runOK("qemu-io", writes + [pristine])
        try qemuImg("snapshot", "-c", "s1", pristine)
        try qemuIO("-c", "write -P 99 0 1M", pristine)
        let name = "amend refcount_bits"
        let figures = try crashDrive(name: name, kills: 6, seed: 41, arguments: ["amend", "-o", "refcount_bits=64", image],
                                     prepare: {
                                         try? FileManager.default.removeItem(atPath: image)
                                         try copySparse(pristine, image)
                                     },
                                     verify: { _ in
                                         guard try crashQemuCheckClean(image, context: name) else { return false }
                                         let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
                                         let data = ((info["format-specific"] as? [String: Any])?["data"] as? [String: Any]) ?? [:]
                                         let bits = (data["refcount-bits"] as? NSNumber)?.intValue ?? 0
                                         #expect(bits == 16 || bits == 64, "\(name): refcount bits \(bits)")
                                         let same = try qemuImgResult(["compare", image, pristine]).status == 0
                                         if !same { Issue.record("\(name): the guest content changed") }
                                         return same && (bits == 16 || bits == 64)
                                     })
        print("crash figures: \(figures.summary)")
    }
}
