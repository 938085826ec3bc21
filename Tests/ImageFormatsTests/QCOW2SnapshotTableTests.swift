import Foundation
import Testing
import DiskIO
@testable import ImageFormats

/// The snapshot table reader's open-time rules (QEMU's qcow2_read_snapshots): a snapshot's
/// L1 table is not validated at open, extra data over 1 KiB and tables over 64 MiB are refused
/// with QEMU's sentences, IDs and names end at a NUL byte.
@Suite struct QCOW2SnapshotTableTests {
    static func entry(l1Offset: UInt64, l1Size: UInt32, id: String = "1", name: String = "snap") -> QCOW2Snapshot {
        QCOW2Snapshot(l1TableOffset: l1Offset, l1Size: l1Size, id: id, name: name, dateSeconds: 7,
                      dateNanoseconds: 0, vmClockNanoseconds: 0, vmStateSize: 0, diskSize: 16 << 16,
                      icount: nil, extraData: [UInt8](repeating: 0, count: 8) + [0, 0, 0, 0, 0, 0x10, 0, 0],
                      entrySize: 0)
    }

    static func withImage(_ count: UInt32, _ bytes: [UInt8], _ body: (String) throws -> Void) throws {
        let dir = NSTemporaryDirectory() + "qcow2-snap-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/s.qcow2"
        try QCOW2ReadUnitTests.makeImage(at: path, l2: [], data: [], snapshotTable: (count, bytes))
        try body(path)
    }

    @Test(arguments: [
        (UInt64(0x20008), UInt32(1)),          // misaligned L1 table
        (UInt64(0x20000), UInt32(0x1000_0000)), // L1 table too large
        (UInt64(1) << 40, UInt32(1)),          // L1 table beyond the end of the file
    ])
    func badSnapshotL1TablesStillOpen(offset: UInt64, size: UInt32) throws {
        let one = Self.entry(l1Offset: offset, l1Size: size)
        try Self.withImage(1, one.serialized()) { path in
            let image = try QCOW2Image.open(path: path)
            defer { try? image.close() }
            #expect(image.snapshots.count == 1)
            #expect(image.snapshots.first?.l1TableOffset == offset)
            #expect(image.snapshots.first?.l1Size == size)
            #expect(try image.info().snapshots.map(\.name) == ["snap"])
        }
    }

    @Test func extraDataOverOneKiBIsRefusedWithQemusSentence() throws {
        var bad = Self.entry(l1Offset: 0x20000, l1Size: 1)
        bad.extraData = [UInt8](repeating: 0, count: 1032)
        var good = bad
        good.extraData = [UInt8](repeating: 0, count: 1024)
        try Self.withImage(2, good.serialized() + bad.serialized()) { path in
            do {
                _ = try QCOW2Image.open(path: path)
                Issue.record("an entry with 1032 bytes of extra data was accepted")
            } catch let error as ImageError {
                #expect(error.message == "Too much extra metadata in snapshot table entry 1\n"
                        + "You can force-remove this extra metadata with qemu-img check -r all")
            }
        }
        // Exactly 1024 bytes is allowed.
        try Self.withImage(1, good.serialized()) { path in
            let image = try QCOW2Image.open(path: path)
            #expect(image.snapshots.first?.extraData.count == 1024)
            try image.close()
        }
    }

    @Test func idAndNameEndAtTheFirstNul() throws {
        let one = Self.entry(l1Offset: 0x20000, l1Size: 1, id: "12\u{0}3", name: "ab\u{0}cd")
        try Self.withImage(1, one.serialized()) { path in
            let image = try QCOW2Image.open(path: path)
            defer { try? image.close() }
            #expect(image.snapshots.first?.id == "12")
            #expect(image.snapshots.first?.name == "ab")
            // The entry still spans its stored lengths.
            #expect(image.snapshots.first?.entrySize == one.serialized().count)
        }
    }

    @Test func qemusTooBigSentence() {
        #expect(QCOW2Snapshot.tooBigMessage(overhanging: 3) == "Snapshot table is too big\n"
                + "You can force-remove all 3 overhanging snapshots with qemu-img check -r all")
    }
}
