import Foundation
import Glibc
import ImageFormats
import Testing
import TestSupport

/// Block devices as targets and sources, as qemu-img uses them: `convert` and `create` write on
/// a device without creating or truncating anything, check its size, zero what the source has
/// as zeros (the device held old data: random bytes here), and read it back like the source;
/// `info`, `check` and `convert` read images from a device. Each case runs qemu-img and simg
/// on twin loop devices that start with the same random bytes, and compares messages, status
/// and, where simg writes the same bytes as qemu-img, the whole devices afterwards.
@Suite("Block devices", .serialized)
struct DeviceTargetTests {
    static let deviceSize = 4 << 20

    @Test("convert -O raw onto a device reads exactly like the source; the old data under zeros is gone",
          arguments: [[String](), ["-t", "none"], ["-t", "writeback"]])
    func convertRawOntoDevice(cache: [String]) throws {
        let dir = try TempDir()
        let source = try makeDeviceTestSource(in: dir)
        let twins = try DeviceTwins(size: Self.deviceSize, in: dir)
        defer { twins.detach() }
        let r = try twins.both(["convert", "-O", "raw"] + cache + [source.qcow2, "dev"])
        expectSameOutcome(r, "convert \(cache)")
        #expect(r.ours.status == 0)
        let raw = try Data(contentsOf: URL(fileURLWithPath: source.raw))
        let (ours, theirs) = try twins.contents()
        #expect(sameBytes(ours.prefix(raw.count), raw), "the device does not read like the source")
        // The random bytes beneath the source's zeros (unallocated, a cluster of zeros written as
        // data, a zero cluster) are gone; past the image the device keeps its bytes, as with qemu-img.
        for range in [65536..<524288, 524288..<589824, 1572864..<1638400] {
            #expect(ours[range].allSatisfy { $0 == 0 }, "old data left at \(range)")
            #expect(!twins.initial[range].allSatisfy { $0 == 0 })
        }
        #expect(sameBytes(ours.suffix(from: raw.count), twins.initial.suffix(from: raw.count)))
        #expect(sameBytes(ours, theirs), "simg and qemu-img left different devices")
    }

    @Test("convert -O qcow2 onto a device: check clean, clusters allocated from the refcounts, content equal",
          arguments: [[String](), ["-t", "none"], ["-c"], ["-o", "preallocation=metadata"],
                      ["-t", "none", "-o", "preallocation=metadata"]])
    func convertQCOW2OntoDevice(options: [String]) throws {
        let dir = try TempDir()
        let source = try makeDeviceTestSource(in: dir)
        let twins = try DeviceTwins(size: Self.deviceSize, in: dir)
        defer { twins.detach() }
        let r = try twins.both(["convert", "-O", "qcow2"] + options + [source.qcow2, "dev"])
        expectSameOutcome(r, "convert \(options)")
        let check = try qemuImgResult(["check", "--output=json", twins.ours.node])
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)")
        // Where the image ends says where clusters went: after the metadata, not at the end of
        // the device (the file size a regular file would have).
        // (Preallocated clusters map the device's old data: the source's zeros are written.)
        let end = try jsonObject(check.stdout)["image-end-offset"] as? Int ?? Int.max
        #expect(end < 1 << 20 || options.contains("preallocation=metadata"), "image end offset \(end)")
        let out = dir.file("back.raw")
        try qemuImg("convert", "-O", "raw", twins.ours.node, out)
        #expect(try filesEqual(out, source.raw))
        for cmd in [["info", "dev"], ["info", "--output=json", "dev"], ["check", "dev"]] {
            expectSameOutcome(try twins.both(cmd), "\(cmd) after convert \(options)")
        }
        if options.isEmpty {
            // The default path writes byte for byte what qemu-img writes.
            let (ours, theirs) = try twins.contents()
            #expect(sameBytes(ours, theirs))
        }
    }

    @Test("a device smaller than the image: qemu-img's error, and the device is not written",
          arguments: [["convert", "-O", "raw", "BIG", "dev"], ["convert", "-O", "raw", "-t", "none", "BIG", "dev"],
                      ["convert", "-O", "raw", "-S", "0", "BIG", "dev"]])
    func deviceTooSmall(arguments: [String]) throws {
        let dir = try TempDir()
        let big = dir.file("big.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", big, "8M")
        try qemuIO("-c", "write -P 7 0 64k", big)
        let twins = try DeviceTwins(size: Self.deviceSize, in: dir)
        defer { twins.detach() }
        let r = try twins.both(arguments.map { $0 == "BIG" ? big : $0 })
        expectSameOutcome(r, "\(arguments)")
        #expect(r.ours.stderr == "simg: dev: error while converting raw: Cannot grow device files\n")
        #expect(sameBytes(try twins.contents().ours, twins.initial))
    }

    /// What the device must look like after simg's command.
    enum After: String, Sendable { case sameAsQemu, unchanged }

    @Test("create on a device: qemu-img's line, errors and result", arguments: [
        (["create", "-f", "raw", "dev", "1M"], After.sameAsQemu),
        (["create", "-f", "raw", "dev", "4194303"], .sameAsQemu),
        (["create", "-f", "raw", "dev", "0"], .sameAsQemu),
        (["create", "-f", "raw", "dev", "5M"], .unchanged),
        (["create", "-f", "raw", "-o", "preallocation=full", "dev", "1M"], .unchanged),
        (["create", "-f", "raw", "-o", "preallocation=falloc", "dev", "1M"], .unchanged),
        (["create", "-f", "raw", "-o", "preallocation=metadata", "dev", "1M"], .unchanged),
        (["create", "-f", "raw", "-o", "preallocation=foo", "dev", "1M"], .unchanged),
        (["create", "-f", "raw", "-o", "extent_size_hint=1M", "dev", "1M"], .unchanged),
        (["create", "-f", "qcow2", "-o", "nocow=on", "dev", "1M"], .unchanged),
        (["create", "-f", "raw", "-o", "help", "dev"], .unchanged),
        (["create", "-f", "qcow2", "dev", "100M"], .sameAsQemu),
        (["create", "-f", "qcow2", "dev", "100G"], .sameAsQemu),
        (["create", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=64", "dev", "1M"], .sameAsQemu),
        (["create", "-f", "qcow2", "-o", "preallocation=metadata", "dev", "1M"], .sameAsQemu),
        (["create", "-f", "qcow2", "-o", "preallocation=metadata", "dev", "100M"], .unchanged),
        (["create", "-f", "qcow2", "-o", "preallocation=full", "dev", "1M"], .unchanged),
        (["create", "-f", "qcow2", "-o", "preallocation=falloc", "dev", "1M"], .unchanged),
    ])
    func createOnDevice(arguments: [String], after: After) throws {
        let dir = try TempDir()
        let twins = try DeviceTwins(size: Self.deviceSize, in: dir)
        defer { twins.detach() }
        let r = try twins.both(arguments)
        expectSameOutcome(r, "\(arguments)")
        let (ours, theirs) = try twins.contents()
        switch after {
        case .sameAsQemu:
            #expect(r.ours.status == 0)
            #expect(sameBytes(ours, theirs), "simg and qemu-img left different devices")
            #expect(!sameBytes(ours, twins.initial))
        case .unchanged:
            #expect(sameBytes(ours, twins.initial), "the device was written")
        }
        if arguments.contains("qcow2") && r.ours.status == 0 {
            for cmd in [["check", "dev"], ["info", "--output=json", "dev"]] {
                expectSameOutcome(try twins.both(cmd), "\(cmd) after \(arguments)")
            }
        }
    }

    @Test("a device too small for the qcow2 metadata: qemu-img's error for each structure, nothing written",
          arguments: [512, 65536, 196608])
    func deviceTooSmallForMetadata(size: Int) throws {
        let dir = try TempDir()
        let source = try makeDeviceTestSource(in: dir).qcow2
        let twins = try DeviceTwins(size: size, in: dir)
        defer { twins.detach() }
        for arguments in [["create", "-f", "qcow2", "dev", "1M"], ["convert", "-O", "qcow2", source, "dev"]] {
            let r = try twins.both(arguments)
            expectSameOutcome(r, "\(arguments) on \(size) bytes")
            #expect(r.ours.status == 1)
            #expect(sameBytes(try twins.contents().ours, twins.initial))
        }
    }

    @Test("info, check and convert read raw and qcow2 images from a device")
    func readFromDevice() throws {
        let dir = try TempDir()
        let source = try makeDeviceTestSource(in: dir)
        let twins = try DeviceTwins(size: Self.deviceSize, in: dir)
        defer { twins.detach() }
        let commands = [["info", "dev"], ["info", "--output=json", "dev"], ["info", "-f", "raw", "dev"],
                        ["check", "dev"], ["check", "--output=json", "dev"]]
        // The random bytes as a raw image ("disk size: 0 B": a device has no blocks of its own).
        for cmd in commands { expectSameOutcome(try twins.both(cmd), "raw: \(cmd)") }
        let out = dir.file("out.raw")
        #expect(try simg("convert", "-O", "raw", twins.ours.node, out).status == 0)
        #expect(sameBytes(try Data(contentsOf: URL(fileURLWithPath: out)), twins.initial))
        // A qcow2 image qemu-img wrote on both devices.
        try qemuImg("convert", "-O", "qcow2", source.qcow2, twins.qemu.node)
        try qemuImg("convert", "-O", "qcow2", source.qcow2, twins.ours.node)
        for cmd in commands { expectSameOutcome(try twins.both(cmd), "qcow2: \(cmd)") }
        let back = dir.file("back.raw")
        #expect(try simg("convert", "-O", "raw", twins.ours.node, back).status == 0)
        #expect(try filesEqual(back, source.raw))
        let again = dir.file("again.qcow2")
        #expect(try simg("convert", "-O", "qcow2", "-t", "none", twins.ours.node, again).status == 0)
        #expect(try qemuImgResult(["compare", again, source.qcow2]).status == 0)
    }

    /// 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB, so a
    /// 3 MiB copy moves the table. On a device the new table must go right after what the
    /// refcount blocks cover (as QEMU places it), not past the end of the device, which is where
    /// the file size of a regular file would have put it.
    @Test func refcountTableGrowsInsideTheDevice() throws {
        let dir = try TempDir()
        let source = dir.file("three.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", source, "4M")
        try qemuIO("-c", "write -P 9 0 3M", source)
        let twins = try DeviceTwins(size: Self.deviceSize, in: dir)
        defer { twins.detach() }
        // Small requests: simg's allocator reserves a whole request's run at once, and a 2 MiB
        // run cannot fit below a table placed at 2 MiB (the regular file grows past the device
        // size then too; noted in docs/SAFETY.md).
        let r = try simg("convert", "--buffer-size=64k", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
                         source, twins.ours.node)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try qemuImgResult(["check", twins.ours.node]).status == 0)
        #expect(try qemuImgResult(["compare", twins.ours.node, source]).status == 0)
    }

    /// A device holds old data, so a cluster simg allocates on it is never taken as reading
    /// zeros: a write into part of a new cluster fills the rest of it (copy-on-write of the
    /// guest's zeros) instead of leaving the device's random bytes there.
    @Test func partialClusterWriteOnADevice() throws {
        let dir = try TempDir()
        try randomBytes(Self.deviceSize).write(to: URL(fileURLWithPath: dir.file("back")))
        let loop = try LoopDevice(backing: dir.file("back"), node: dir.file("dev"))
        defer { loop.detach() }
        #expect(try simg("create", "-q", "-f", "qcow2", loop.node, "1M").status == 0)
        let image = try ImageOpener.open(loop.node, options: OpenOptions(format: .qcow2, writable: true))
        let data = [UInt8](repeating: 0x5a, count: 100)
        try data.withUnsafeBytes { try image.write($0, at: 70_000) }
        try image.close()
        #expect(try qemuImgResult(["check", loop.node]).status == 0)
        let out = dir.file("out.raw")
        try qemuImg("convert", "-O", "raw", loop.node, out)
        var expected = Data(count: 1 << 20)
        expected.replaceSubrange(70_000..<70_100, with: data)
        #expect(sameBytes(try Data(contentsOf: URL(fileURLWithPath: out)), expected))
    }

    /// `check -r` meets a refcount block past the end of the device: a file would be grown to
    /// hold it, a device cannot (QEMU's words, EINVAL), and the table is rebuilt instead.
    @Test func repairCannotGrowADevice() throws {
        let dir = try TempDir()
        let twins = try DeviceTwins(size: Self.deviceSize, in: dir)
        defer { twins.detach() }
        for node in [twins.qemu.node, twins.ours.node] {
            try qemuImg("create", "-q", "-f", "qcow2", node, "1M")
            // Refcount table entry 1 (the table is at 64 KiB) points at 8 MiB.
            let handle = try #require(FileHandle(forWritingAtPath: node))
            try handle.seek(toOffset: 65536 + 8)
            try handle.write(contentsOf: Data([0, 0, 0, 0, 0, 0x80, 0, 0]))
            try handle.close()
        }
        for cmd in [["check", "dev"], ["check", "-r", "all", "dev"], ["check", "dev"]] {
            let r = try twins.both(cmd)
            expectSameOutcome(r, "\(cmd)")
            if cmd.contains("-r") { #expect(r.ours.stderr.contains("Cannot grow device files")) }
        }
        #expect(twins.ours.state?.type == S_IFBLK)
    }

    /// Two nodes of one device are one file: converting from one onto the other is refused as
    /// writing over a file being read (qemu-img's locks live on the node and would let it through).
    @Test func sourceAndTargetOnTheSameDevice() throws {
        let dir = try TempDir()
        try randomBytes(Self.deviceSize).write(to: URL(fileURLWithPath: dir.file("back")))
        let loop = try LoopDevice(backing: dir.file("back"), node: dir.file("a"))
        defer { loop.detach() }
        var status = stat()
        #expect(stat(loop.node, &status) == 0)
        try makeNode(dir.file("b"), type: S_IFBLK, rdev: UInt64(status.st_rdev))
        let before = try readPrefix(loop.node, Self.deviceSize)
        let r = try simg(in: dir.path, "convert", "-O", "raw", "a", "b")
        #expect(r.status == 1)
        #expect(r.stderr == "simg: b: error while converting raw: Failed to get \"write\" lock\nIs another process using the image [b]?\n")
        #expect(sameBytes(try readPrefix(loop.node, Self.deviceSize), before))
        #expect(nodeState(dir.file("b"))?.type == S_IFBLK)
    }
}
