import Foundation
import Glibc
import Testing
import TestSupport

/// Cloning by default and `-C` copy offloading in `convert`: on an XFS made with reflink=1 (a
/// loop device over a file, mounted in the test's folder) data runs on the block grid are
/// cloned, so the target's extents are shared with the source's (filefrag's "shared" flag);
/// `--no-reflink` copies instead; on ext4 (/var/tmp) `-C` goes through copy_file_range. The
/// content always reads like the source. The XFS cases fail (never skip) without a loop device.
@Suite("Reflink and copy offload", .serialized)
struct ReflinkTests {
    /// A source raw image: random data at 0 (1 MiB) and 4 MiB (3 MiB), a hole between, and an
    /// odd-sized data tail past 12 MiB: 4.5 KiB, whole sectors (raw sizes are), not whole
    /// 4 KiB blocks.
    static func makeSource(_ path: String) throws {
        try writeBytes(pattern(seed: 1, count: 1 << 20), to: path, at: 0)
        try writeBytes(pattern(seed: 2, count: 3 << 20), to: path, at: 4 << 20)
        try writeBytes(pattern(seed: 3, count: 4608), to: path, at: 12 << 20)
    }

    /// `--stats`' counter `key` from stderr.
    static func stat(_ key: String, _ r: ProcessResult) -> UInt64? {
        guard let range = r.stderr.range(of: "\"\(key)\": ") else { return nil }
        return UInt64(r.stderr[range.upperBound...].prefix { $0.isNumber })
    }

    /// Whether filefrag (after syncing the file) reports any extent of `path` as shared.
    static func hasSharedExtents(_ path: String) throws -> Bool {
        let r = try runOK("filefrag", ["-s", "-v", path])
        return r.stdout.split(separator: "\n").contains { $0.contains("shared") }
    }

    static func sameFiles(_ a: String, _ b: String) throws -> Bool {
        try Data(contentsOf: URL(fileURLWithPath: a)) == Data(contentsOf: URL(fileURLWithPath: b))
    }

    @Test("raw to raw on XFS reflink: cloned by default (shared extents), copied with --no-reflink")
    func rawToRaw() throws {
        let xfs = try XFSMount()
        defer { xfs.unmount() }
        let source = xfs.file("a.raw")
        try Self.makeSource(source)
        let cloned = try simg("convert", "--stats", "-O", "raw", source, xfs.file("b.raw"))
        #expect(cloned.status == 0, "\(cloned.stderr)")
        #expect(try Self.sameFiles(source, xfs.file("b.raw")))
        #expect(try Self.hasSharedExtents(xfs.file("b.raw")), "no extent of the target is shared")
        // 1 MiB + 3 MiB + the tail's whole block cloned; the tail's last 512 bytes copied.
        #expect(Self.stat("bytes-cloned", cloned) == (4 << 20) + 4096)
        #expect(Self.stat("bytes-written", cloned) == 512)

        let copied = try simg("convert", "--stats", "--no-reflink", "-O", "raw", source, xfs.file("c.raw"))
        #expect(copied.status == 0, "\(copied.stderr)")
        #expect(try Self.sameFiles(source, xfs.file("c.raw")))
        #expect(try !Self.hasSharedExtents(xfs.file("c.raw")), "--no-reflink shared extents")
        #expect(Self.stat("bytes-cloned", copied) == 0)
    }

    @Test("raw and qcow2 to qcow2, qcow2 to raw on XFS reflink: host-contiguous runs cloned, images check clean")
    func qcow2() throws {
        let xfs = try XFSMount()
        defer { xfs.unmount() }
        let source = xfs.file("a.raw")
        try Self.makeSource(source)
        let toQcow2 = try simg("convert", "--stats", "-O", "qcow2", source, xfs.file("b.qcow2"))
        #expect(toQcow2.status == 0, "\(toQcow2.stderr)")
        #expect((Self.stat("bytes-cloned", toQcow2) ?? 0) >= 4 << 20)
        #expect(try Self.hasSharedExtents(xfs.file("b.qcow2")))
        try qemuImg("check", "-q", xfs.file("b.qcow2"))
        try qemuImg("compare", "-q", source, xfs.file("b.qcow2"))

        // A qcow2 that qemu-img wrote (its clusters host-contiguous) back to raw.
        try qemuImg("convert", "-O", "qcow2", source, xfs.file("q.qcow2"))
        let toRaw = try simg("convert", "--stats", "-O", "raw", xfs.file("q.qcow2"), xfs.file("c.raw"))
        #expect(toRaw.status == 0, "\(toRaw.stderr)")
        #expect((Self.stat("bytes-cloned", toRaw) ?? 0) >= 4 << 20)
        #expect(try Self.sameFiles(source, xfs.file("c.raw")))
        #expect(try Self.hasSharedExtents(xfs.file("c.raw")))

        // qcow2 to qcow2: the clusters cloned into fresh clusters of the target.
        let toQcow2Again = try simg("convert", "--stats", "-O", "qcow2", xfs.file("q.qcow2"), xfs.file("d.qcow2"))
        #expect(toQcow2Again.status == 0, "\(toQcow2Again.stderr)")
        #expect((Self.stat("bytes-cloned", toQcow2Again) ?? 0) >= 4 << 20)
        #expect(try Self.hasSharedExtents(xfs.file("d.qcow2")))
        try qemuImg("check", "-q", xfs.file("d.qcow2"))
        try qemuImg("compare", "-q", source, xfs.file("d.qcow2"))
    }

    @Test("-C on ext4 copies through copy_file_range, content equal, any alignment")
    func copyOffloadOnExt4() throws {
        let dir = try TempDir(in: .varTmp)
        let source = dir.file("a.raw")
        try Self.makeSource(source)
        let r = try simg("convert", "--stats", "-C", "-O", "raw", source, dir.file("b.raw"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try Self.sameFiles(source, dir.file("b.raw")))
        // Everything, the odd tail too, went through the kernel.
        #expect(Self.stat("bytes-offloaded", r) == (4 << 20) + 4608)
        #expect(Self.stat("bytes-read", r) == 0)
        #expect(Self.stat("bytes-cloned", r) == 0)
        // Into a qcow2 target's fresh clusters (mapped once the kernel has copied them).
        let toQcow2 = try simg("convert", "--stats", "-C", "-O", "qcow2", source, dir.file("b.qcow2"))
        #expect(toQcow2.status == 0, "\(toQcow2.stderr)")
        #expect((Self.stat("bytes-offloaded", toQcow2) ?? 0) >= 4 << 20)
        try qemuImg("check", "-q", dir.file("b.qcow2"))
        try qemuImg("compare", "-q", source, dir.file("b.qcow2"))
        // Without -C ext4 cannot clone: copied the usual way, same bytes.
        let plain = try simg("convert", "--stats", "-O", "raw", source, dir.file("c.raw"))
        #expect(plain.status == 0)
        #expect(try Self.sameFiles(source, dir.file("c.raw")))
        #expect(Self.stat("bytes-cloned", plain) == 0 && Self.stat("bytes-offloaded", plain) == 0)
    }
}

/// An XFS with reflink=1 on a loop device over a sparse file in a /var/tmp folder, mounted
/// in that folder. `unmount()` (in a defer) unmounts and detaches the device.
final class XFSMount {
    let dir: TempDir
    let loop: LoopDevice
    let mountPoint: String
    private var mounted = false

    init() throws {
        dir = try TempDir(in: .varTmp)
        let image = dir.file("xfs.img")
        // 320 MiB: mkfs.xfs refuses file systems under 300 MiB.
        try runOK("truncate", ["-s", "320M", image])
        try runOK("mkfs.xfs", ["-q", "-m", "reflink=1", image])
        loop = try LoopDevice(backing: image, node: dir.file("xfs.dev"))
        mountPoint = dir.file("mnt")
        do {
            try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
            try runOK("mount", [loop.node, mountPoint])
        } catch {
            loop.detach()
            throw error
        }
        mounted = true
    }

    func file(_ name: String) -> String { mountPoint + "/" + name }

    func unmount() {
        if mounted {
            mounted = false
            let r = try? run("umount", [mountPoint])
            if r?.status != 0 { Issue.record("umount \(mountPoint) failed: \(r?.stderr ?? "not run")") }
        }
        loop.detach()
    }

    deinit { unmount() }
}
