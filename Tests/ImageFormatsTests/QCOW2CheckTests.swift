import Foundation
import Testing
import DiskIO
@testable import ImageFormats
import TestSupport

/// The qcow2 check on images simg makes itself (no qemu needed): refcount entry encoding,
/// the count array, and detection and repair of leaks, raised and missing refcounts.
@Suite struct QCOW2CheckTests {
    @Test(arguments: 0...6)
    func refcountEntriesMatchTheBlockLayout(order: Int) {
        let bits = 1 << order
        let entries = 64 * 8 / bits
        var bytes = [UInt8](repeating: 0, count: 64)
        var words = [UInt64](repeating: 0, count: 8)
        let mask: UInt64 = bits == 64 ? .max : (1 << UInt64(bits)) - 1
        for i in 0..<entries {
            let value = (UInt64(i) &* 0x9E37_79B9_7F4A_7C15) & mask
            QCOW2RefcountEntry.set(&bytes, i, order: order, value: value)
            QCOW2TableCache.setRefcount(in: &words, index: i, order: order, value: value)
        }
        // Both encoders give the same on-disk bytes, and decoding gives the values back.
        #expect(QCOW2BE.bytes(words) == bytes)
        for i in 0..<entries {
            #expect(QCOW2RefcountEntry.get(bytes, i, order: order) == (UInt64(i) &* 0x9E37_79B9_7F4A_7C15) & mask)
        }
    }

    @Test func countsGrowZeroedAndCapAtTheWidth() {
        let counts = QCOW2CheckCounts(clusters: 3, refcountOrder: 1)
        #expect(counts.limit == 3)
        counts.set(10, 2)
        #expect(counts.count == 11)
        #expect(counts[5] == 0 && counts[10] == 2 && counts[11] == 0)
        counts.grow(to: 1000)
        #expect((0..<1000).allSatisfy { counts[$0] == ($0 == 10 ? 2 : 0) })
        counts.reset()
        #expect(counts[10] == 0)
        #expect(QCOW2CheckCounts(clusters: 1, refcountOrder: 6).limit == UInt64(UInt32.max))
    }

    /// A 4 MiB image with data in clusters at guest 0, 64k and 1 MiB.
    static func makeImage(_ path: String) throws {
        try ImageCreator.create(CreateRequest(format: .qcow2, path: path, size: 4 << 20), announce: { _ in })
        let image = try QCOW2Image.open(path: path, writable: true)
        let data = [UInt8](repeating: 0x5a, count: 128 << 10)
        try data.withUnsafeBytes { try image.write($0, at: 0) }
        try data.withUnsafeBytes { try image.write(UnsafeRawBufferPointer(rebasing: $0[0..<65536]), at: 1 << 20) }
        try image.close()
    }

    /// `makeImage` with one leaked cluster just past its end; returns that old end.
    static func makeLeakyImage(_ path: String) throws -> UInt64 {
        try makeImage(path)
        let file = try DiskFile.open(path, access: .readWrite)
        let end = try file.size()
        try file.truncate(to: end + 65536)
        file.close()
        try setRefcount(path, cluster: end >> 16, 1)
        return end
    }

    /// Sets a 16-bit refcount in the first refcount block.
    static func setRefcount(_ path: String, cluster: UInt64, _ value: UInt16) throws {
        let file = try DiskFile.open(path, access: .readWrite)
        defer { file.close() }
        let header = try file.readBytes(count: 112, at: 0)
        let block = QCOW2BE.u64(try file.readBytes(count: 8, at: QCOW2BE.u64(header, 48)), 0)
        try file.write([UInt8(value >> 8), UInt8(value & 0xff)], at: block + 2 * cluster)
    }

    static func check(_ path: String, _ repair: CheckRepair = .none) throws -> (ImageCheckResult, [String]) {
        final class Lines: @unchecked Sendable { var all: [String] = [] }  // used by this thread only
        let lines = Lines()
        let result = try ImageChecker.check(path: path, format: .qcow2, repair: repair) { lines.all.append($0) }
        return (result, lines.all)
    }

    @Test func cleanImageChecksClean() throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        try Self.makeImage(dir.file("a.qcow2"))
        let (r, lines) = try Self.check(dir.file("a.qcow2"))
        #expect(lines.isEmpty)
        #expect(r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0)
        #expect(r.totalClusters == 64)
        #expect(r.allocatedClusters == 3)
        #expect(r.imageEndOffset == UInt64(try DiskFile.open(dir.file("a.qcow2"), access: .readOnly).size()))
    }

    @Test func leakFoundAndFreed() throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = dir.file("a.qcow2")
        let end = try Self.makeLeakyImage(path)
        var (r, lines) = try Self.check(path)
        #expect(r.leaks == 1 && r.corruptions == 0)
        #expect(lines == ["Leaked cluster \(end >> 16) refcount=1 reference=0\n"])
        (r, lines) = try Self.check(path, .leaks)
        #expect(r.leaksFixed == 1 && r.leaks == 0)
        #expect(lines.last == "Repairing cluster \(end >> 16) refcount=1 reference=0\n")
        (r, _) = try Self.check(path)
        #expect(r.leaks == 0 && r.corruptions == 0)
    }

    /// check -r repairs the file it locked: renamed away and replaced by another leaky image
    /// meanwhile, the renamed file is repaired and the one now under the name is untouched.
    @Test func repairGoesToTheOpenFileNotTheName() throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = dir.file("a.qcow2"), moved = dir.file("moved.qcow2")
        _ = try Self.makeLeakyImage(path)
        let leaky = try Data(contentsOf: URL(fileURLWithPath: path))

        let locked = try DiskFile.open(path, access: .readOnly)
        defer { locked.close() }
        try FileManager.default.moveItem(atPath: path, toPath: moved)
        try leaky.write(to: URL(fileURLWithPath: path))
        let r = try ImageChecker.check(file: locked, path: path, format: .qcow2, repair: .leaks, report: { _ in })
        #expect(r.leaksFixed == 1 && r.leaks == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == leaky)
        #expect(try Self.check(moved).0.leaks == 0)
        #expect(try Self.check(path).0.leaks == 1)
    }

    @Test func missingRefcountNeedsRebuild() throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = dir.file("a.qcow2")
        try Self.makeImage(path)
        let before = try QCOW2Image.open(path: path)
        let hostOffset = try #require({ () -> UInt64? in
            if case .data(let h) = try before.blockStatus(at: 1 << 20, length: 65536).kind { return h }
            return nil
        }())
        try before.close()
        try Self.setRefcount(path, cluster: hostOffset >> 16, 0)
        var (r, lines) = try Self.check(path)
        #expect(r.corruptions >= 1)
        #expect(lines.contains("ERROR cluster \(hostOffset >> 16) refcount=0 reference=1\n"))
        // -r leaks cannot rebuild: the check does not complete.
        #expect(throws: ImageCheckFailure.self) { _ = try Self.check(path, .leaks) }
        (r, lines) = try Self.check(path, .all)
        #expect(lines.contains("Rebuilding refcount structure\n"))
        #expect(r.corruptionsFixed >= 1 && r.corruptions == 0)
        (r, lines) = try Self.check(path)
        #expect(r.corruptions == 0 && r.leaks == 0 && lines.isEmpty)
        // The data is still there.
        let after = try QCOW2Image.open(path: path)
        var buffer = [UInt8](repeating: 0, count: 65536)
        try buffer.withUnsafeMutableBytes { try after.read(into: $0, at: 1 << 20) }
        try after.close()
        #expect(buffer.allSatisfy { $0 == 0x5a })
    }
}
