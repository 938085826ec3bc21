import Foundation
import Testing
import TestSupport

/// `convert -n` into a qcow2 image that already holds data: the source's zero and unallocated
/// ranges give the target's host clusters back, as qemu-img's zero writes with MAY_UNMAP do
/// (v3: zero clusters without a host offset; v2 without a backing file: unallocated; v2 over
/// a backing file: zeros written as data, there is no other way to hide the backing file).
@Suite struct ConvertExistingTargetTests {
    /// An 8 MiB raw source: data at 1 MiB (64 KiB) and 5 MiB (128 KiB), zeros written as data
    /// at 3 MiB (256 KiB), holes everywhere else.
    static func makeSparseSource(_ dir: TempDir) throws -> String {
        let source = dir.file("source.raw")
        try convertWritePattern(source, offset: 1 << 20, count: 64 << 10, seed: 21)
        try convertWritePattern(source, offset: 5 << 20, count: 128 << 10, seed: 22)
        try convertTruncate(source, to: 8 << 20)
        guard let handle = FileHandle(forWritingAtPath: source) else { throw ToolError.missing(source) }
        try handle.seek(toOffset: 3 << 20)
        handle.write(Data(count: 256 << 10))
        try handle.close()
        return source
    }

    /// An 8 MiB qcow2 target written in full (every cluster allocated), made by qemu-img.
    static func makeFullTarget(_ path: String, options: [String], backing: String?) throws {
        var args = ["create", "-q", "-f", "qcow2"]
        if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
        if let backing { args += ["-b", backing, "-F", "raw"] }
        try runOK("qemu-img", args + [path, "8M"])
        try qemuIO("-f", "qcow2", "-c", "write -P 0x99 0 8M", path)
    }

    static func allocatedClusters(_ path: String) throws -> Int {
        let r = try qemuImgResult(["check", "--output=json", path])
        let json = try jsonObject(r.stdout)
        return (json["allocated-clusters"] as? NSNumber)?.intValue ?? -1
    }

    struct Case: CustomStringConvertible, Sendable {
        var options: [String]
        var backing = false
        var description: String { options.joined(separator: ",") + (backing ? " over a backing file" : "") }
    }

    static let cases: [Case] = [
        Case(options: []), Case(options: ["compat=0.10"]), Case(options: ["extended_l2=on"]),
        Case(options: ["preallocation=metadata"]), Case(options: ["cluster_size=4096"]),
        Case(options: [], backing: true), Case(options: ["extended_l2=on"], backing: true),
        Case(options: ["compat=0.10"], backing: true),
    ]

    @Test("convert -n frees the target's host clusters where the source reads as zeros", arguments: cases)
    func zeroRangesFreeHostClusters(_ c: Case) throws {
        let dir = try TempDir()
        let source = try Self.makeSparseSource(dir)
        var backing: String?
        if c.backing {
            backing = dir.file("base.raw")
            try convertWritePattern(backing!, offset: 0, count: 8 << 20, seed: 23)
        }
        let ours = dir.file("simg.qcow2"), theirs = dir.file("qemu.qcow2")
        try Self.makeFullTarget(ours, options: c.options, backing: backing)
        try Self.makeFullTarget(theirs, options: c.options, backing: backing)
        try simgConvertOK(["-n", "-f", "raw", "-O", "qcow2", source, ours])
        try runOK("qemu-img", ["convert", "-n", "-f", "raw", "-O", "qcow2", source, theirs])

        // The guest reads as the source, and nothing leaked or broke.
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, ours)
        let check = try qemuImgResult(["check", ours])
        #expect(check.status == 0, "\(c): qemu-img check: \(check.stdout) \(check.stderr)")

        let mine = try Self.allocatedClusters(ours), qemus = try Self.allocatedClusters(theirs)
        let bytes = try convertAllocatedBytes(ours), qemuBytes = try convertAllocatedBytes(theirs)
        if c.backing && c.options.contains("compat=0.10") {
            // No zero flag, and unallocated would show the backing file: zeros are data.
            #expect(mine == qemus, "\(c): \(mine) clusters allocated, qemu-img's \(qemus)")
            return
        }
        // At most qemu-img's clusters stay allocated (qemu-img may keep one more, the cluster
        // holding the zero block qemu-img create wrote at the start of a raw file), and the
        // freed clusters' space went back to the file system.
        #expect(mine <= qemus, "\(c): \(mine) clusters allocated, qemu-img's \(qemus)")
        let clusterSize: UInt64 = c.options.contains("cluster_size=4096") ? 4096 : 65536
        #expect(mine <= Int((192 << 10) / clusterSize) + 1, "\(c): \(mine) clusters still allocated")
        #expect(bytes <= qemuBytes + 65536, "\(c): \(bytes) bytes on disk, qemu-img's output \(qemuBytes)")
        #expect(bytes < 2 << 20, "\(c): \(bytes) bytes on disk for 192 KiB of data")
        // The zero ranges map to no host data.
        for entry in try qemuMap(ours) where entry.data {
            let inData = (entry.start >= 1 << 20 && entry.end <= (1 << 20) + (64 << 10))
                || (entry.start >= 5 << 20 && entry.end <= (5 << 20) + (128 << 10))
            #expect(inData, "\(c): \(entry.start)+\(entry.length) still maps host data")
        }
    }

    /// The same over a target with compressed clusters: they are dropped for the zeros too.
    @Test func compressedClustersAreFreed() throws {
        let dir = try TempDir()
        let source = try Self.makeSparseSource(dir)
        let full = dir.file("full.raw"), target = dir.file("target.qcow2")
        try convertWritePattern(full, offset: 0, count: 8 << 20, seed: 24)
        try qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", full, target)
        try simgConvertOK(["-n", "-f", "raw", "-O", "qcow2", source, target])
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, target)
        let check = try qemuImgResult(["check", target])
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)")
        #expect(try Self.allocatedClusters(target) <= 3)
    }
}

/// Killed at any moment, `convert -n` that frees clusters leaves a target qemu-img check
/// calls clean (leaks allowed: a kill between the table write and the refcount decrement) in
/// which every 4 KiB cluster (one page, never torn) reads as before or as the source: a freed
/// cluster is never still referenced on disk, punched or reused.
@Suite struct ConvertExistingTargetCrashTests {
    @Test(arguments: ["1.1", "0.10"])
    func killedWhileFreeing(_ compat: String) throws {
        let dir = try TempDir()
        let source = dir.file("src.raw"), pristine = dir.file("pristine.qcow2"), target = dir.file("target.qcow2")
        // A quarter of the source is zeros (every fourth MiB), freed in the target.
        try crashSource(source, megabytes: 8, compressible: false, seed: 31)
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,compat=\(compat)", pristine, "8M")
        try qemuIO("-f", "qcow2", "-c", "write -P 0x99 0 8M", pristine)
        let sourceBytes = try crashReadAll(source), oldBytes = try crashGuestBytes(pristine, dir)
        let name = "convert -n freeing clusters (compat=\(compat))"
        var mixed = 0
        let figures = try crashDrive(name: name, kills: 12, seed: 17,
                                     arguments: ["convert", "-n", "-f", "raw", "-O", "qcow2", source, target],
                                     prepare: {
            try? FileManager.default.removeItem(atPath: target)
            try copySparse(pristine, target)
        }, verify: { landed in
            guard try crashQemuCheckClean(target, context: name) else { return false }
            if !landed {
                // Finished: nothing leaked, and the zeros hold no clusters.
                let check = try qemuImgResult(["check", target])
                #expect(check.status == 0, "\(name): \(check.stdout)")
                #expect(try ConvertExistingTargetTests.allocatedClusters(target) <= 1536 + 8)
            }
            let guest = try crashGuestBytes(target, dir)
            guard let partWay = crashOldOrNew(guest, new: sourceBytes, old: oldBytes, name) else { return false }
            if partWay { mixed += 1 }
            return true
        })
        print("crash figures: \(figures.summary); \(mixed) killed part-way (some clusters old, some new)")
    }
}
