import Foundation
import Testing
import TestSupport

/// A corrupt snapshot table itself (too many entries, a bad table offset, too much extra data,
/// incomplete version 3 entries) and bad snapshot L1 tables: `simg check` in every mode and
/// `simg info` against qemu-img on identical copies of images edited by hand.
@Suite struct CheckSnapshotTableTests {
    typealias Editor = CheckInteropTests.Editor

    enum TableDamage: String, CaseIterable {
        case extraDataTooLarge, tableBeyondEOF, incompleteEntry, misalignedTableOffset, tooManySnapshots
    }

    /// A 4 MiB image with data and one internal snapshot, its guest content saved as raw in
    /// `content`; returns the snapshot table's offset.
    static func makeSnapshotImage(_ path: String, content: String) throws -> UInt64 {
        try CheckInteropTests.makeImage(path)
        _ = try qemuImg("snapshot", "-c", "s1", path)
        _ = try qemuIO("-c", "write -P 7 0 64k", path)
        _ = try qemuImg("convert", "-O", "raw", path, content)
        return try Editor(path: path).u64(64)
    }

    static func damage(_ d: TableDamage, _ path: String, table: UInt64) throws {
        let e = Editor(path: path)
        switch d {
        case .extraDataTooLarge: try e.write(table + 36, [0, 0, 0x07, 0xd0])  // 2000 bytes
        case .tableBeyondEOF: try e.put64(64, 0x1000_0000)
        case .incompleteEntry: try e.write(table + 36, [0, 0, 0, 8])
        case .misalignedTableOffset: try e.put64(64, table + 8)
        case .tooManySnapshots: try e.write(60, [0, 1, 0x11, 0x70])  // 70000
        }
    }

    @Test(arguments: TableDamage.allCases)
    func brokenTablesMatchQemu(_ d: TableDamage) throws {
        let dir = try TempDir()
        let image = dir.file("img.qcow2")
        let table = try Self.makeSnapshotImage(image, content: dir.file("before.raw"))
        try Self.damage(d, image, table: table)
        var modes = CheckInteropTests.modes
        // qemu-img itself fails to rewrite a table of 65536 entries read past the end of the
        // file (its overlap check stops it) and leaves its own refcount repairs unwritten.
        if d == .tooManySnapshots { modes = modes.filter { !$0.contains("all") } }
        // The damage is in the snapshot table only: the active data is what it was.
        for args in modes { try CheckInteropTests.compare(image, args, original: dir.file("before.raw")) }
        // A table the check reads itself (the image does not open): the same through file:
        // and json: names of the file.
        for name in ["file:img.qcow2", "json:{\"file.filename\":\"img.qcow2\"}"] {
            try CheckInteropTests.compare(image, [], original: dir.file("before.raw"), name: name)
        }
        #expect(try qemuImgResult(["check", image]).status != 0)
    }

    @Test func repairedTablesAreCleanInQemu() throws {
        for d in [TableDamage.extraDataTooLarge, .tableBeyondEOF, .incompleteEntry] {
            let dir = try TempDir()
            let image = dir.file("img.qcow2")
            let table = try Self.makeSnapshotImage(image, content: dir.file("before.raw"))
            try Self.damage(d, image, table: table)
            let repair = try run(simgBinary, ["check", "-r", "all", image])
            #expect(repair.status == 0, "\(d): \(repair.stderr)")
            #expect(repair.stdout.contains("Double checking the fixed image now...\nNo errors were found on the image.\n"), "\(d)")
            let q = try qemuImgResult(["check", image])
            #expect(q.status == 0 && q.stdout.hasPrefix("No errors were found on the image.\n"), "\(d): \(q.stdout)")
            _ = try qemuImg("convert", "-O", "raw", image, dir.file("after.raw"))
            #expect(try filesEqual(dir.file("before.raw"), dir.file("after.raw")), "\(d)")
            // The snapshot is still listed, its extra data now QEMU's 24 known bytes at least.
            let info = try qemuImg("info", "--output=json", image)
            let snapshots = try #require(try jsonObject(info.stdout)["snapshots"] as? [[String: Any]])
            #expect(snapshots.count == 1, "\(d)")
            let extra = try Editor(path: image).u32(try Editor(path: image).u64(64) + 36)
            #expect(extra >= 24 && extra <= 1024, "\(d): extra_data_size \(extra)")
        }
    }

    /// A table of more than 64 MiB (520 entries with 64 KiB IDs and names): open refuses it,
    /// check fails without -r all and drops the overhanging entries with it.
    @Test func tableOverSixtyFourMiB() throws {
        let dir = try TempDir()
        let image = dir.file("big.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", image, "1M")
        _ = try qemuIO("-c", "write -P 5 0 64k", image)
        _ = try qemuImg("convert", "-O", "raw", image, dir.file("before.raw"))
        var entry: [UInt8] = [UInt8](repeating: 0, count: 12) + [0xff, 0xff, 0xff, 0xff]
        entry += [UInt8](repeating: 0, count: 20) + [0, 0, 0, 24]
        entry += [UInt8](repeating: 0, count: 8) + [0, 0, 0, 0, 0, 0x10, 0, 0] + [UInt8](repeating: 0xff, count: 8)
        entry += [UInt8](repeating: 0x69, count: 65535) + [UInt8](repeating: 0x6e, count: 65535)
        entry += [UInt8](repeating: 0, count: (8 - entry.count % 8) % 8)
        let e = Editor(path: image)
        let table = (try e.size() + 65535) & ~65535
        var all = Data(capacity: entry.count * 520)
        for _ in 0..<520 { all.append(contentsOf: entry) }
        let h = try #require(FileHandle(forUpdatingAtPath: image))
        try h.seek(toOffset: table)
        try h.write(contentsOf: all)
        try h.close()
        try e.write(60, [0, 0, 0x02, 0x08])  // 520 entries
        try e.put64(64, table)
        let s = try run(simgBinary, ["info", image])
        let q = try qemuImgResult(["info", image])
        #expect(s.status == 1 && q.status == 1)
        #expect("qemu-img" + s.stderr.dropFirst(4) == q.stderr)
        #expect(q.stderr.contains("Snapshot table is too big\nYou can force-remove all 9 overhanging snapshots"))
        // Three modes only: every copy is 68 MB.
        for args in [[], ["-r", "leaks", "--output=json"], ["-r", "all"]] {
            try CheckInteropTests.compare(image, args, original: dir.file("before.raw"))
        }
    }

    /// QEMU opens images whose snapshot L1 table is misaligned, too large or past the end of
    /// the file (only using the snapshot would need it): info lists the snapshot.
    @Test(arguments: ["misaligned", "tooLarge", "beyondEOF"])
    func infoListsSnapshotsWithBadL1Tables(_ kind: String) throws {
        let dir = try TempDir()
        let image = dir.file("img.qcow2")
        let table = try Self.makeSnapshotImage(image, content: dir.file("before.raw"))
        let e = Editor(path: image)
        switch kind {
        case "misaligned": try e.put64(table, try e.u64(table) + 8)
        default:
            if kind == "tooLarge" { try e.write(table + 8, [0x10, 0, 0, 0]) } else { try e.put64(table, 1 << 32) }
        }
        for args in [["info", image], ["info", "--output=json", image]] {
            let s = try run(simgBinary, args)
            let q = try qemuImgResult(args)
            #expect(q.status == 0 && s.status == 0, "\(kind) \(args): \(s.stderr)")
            #expect(s.stdout == q.stdout, "\(kind) \(args)")
            #expect(s.stdout.contains("s1"), "\(kind) \(args)")
        }
        // check runs (no special case needed) and matches qemu-img in every mode. With an L1
        // size this large QEMU's overlap check stops its own -r all (the bogus table covers
        // the L2 tables it would rewrite); simg stops there too, with the same output, but
        // the refcount repairs it already made stay written where QEMU's are dropped.
        for args in CheckInteropTests.modes where kind != "tooLarge" || !args.contains("all") {
            try CheckInteropTests.compare(image, args, original: nil)
        }
        if kind == "tooLarge" {
            for args in [["-r", "all"], ["-r", "all", "--output=json"]] {
                let work = try TempDir()
                _ = try runOK("cp", [image, work.file("s.qcow2")])
                _ = try runOK("cp", [image, work.file("q.qcow2")])
                let s = try run(simgBinary, ["check"] + args + ["s.qcow2"], in: work.path)
                let q = try qemuImgResult(in: work.path, ["check"] + args + ["q.qcow2"])
                #expect(s.status == 1 && q.status == 1, "\(args)")
                #expect(s.stdout == q.stdout.replacingOccurrences(of: "q.qcow2", with: "s.qcow2"), "\(args)")
                #expect(s.stderr.contains("overlaps with inactive L1 table"), "\(args)")
            }
        }
    }

    /// An entry with more than 1 KiB of extra data: both refuse to open it, with QEMU's hint.
    @Test func infoRefusesTooMuchExtraData() throws {
        let dir = try TempDir()
        let image = dir.file("img.qcow2")
        let table = try Self.makeSnapshotImage(image, content: dir.file("before.raw"))
        try Self.damage(.extraDataTooLarge, image, table: table)
        let s = try run(simgBinary, ["info", image])
        let q = try qemuImgResult(["info", image])
        #expect(s.status == 1 && q.status == 1)
        #expect("qemu-img" + s.stderr.dropFirst(4) == q.stderr)
    }
}
