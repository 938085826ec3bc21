import DiskIO
import Foundation
import Testing
import TestSupport

/// CopyOffload on ext4 (/var/tmp), which copies in the kernel but cannot share extents: the
/// clone and its probe answer "not here" (never an error, nothing written), copy_file_range
/// copies any range and stops at the source's end. Cloning itself is tested on XFS in the
/// interop tests (ReflinkTests).
@Suite("CopyOffload")
struct CopyOffloadTests {
    @Test func copyMovesTheBytesAndStopsAtTheSourceEnd() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let source = try DiskFile.create(folder.file("a"))
        let target = try DiskFile.create(folder.file("b"))
        let bytes = pattern(seed: 4, count: 100_000)
        try source.write(bytes, at: 0)
        #expect(try CopyOffload.copy(from: source, at: 1000, to: target, at: 333, length: 50_000) == .done(50_000))
        #expect(try target.readBytes(count: 50_000, at: 333) == Array(bytes[1000..<51_000]))
        // Asked past the end: what there is.
        #expect(try CopyOffload.copy(from: source, at: 90_000, to: target, at: 0, length: 20_000) == .done(10_000))
        #expect(try target.readBytes(count: 10_000, at: 0) == Array(bytes[90_000..<100_000]))
    }

    @Test func cloneOnExt4IsRefusedWithoutAnError() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let source = try DiskFile.create(folder.file("a"))
        let target = try DiskFile.create(folder.file("b"))
        try source.write(pattern(seed: 5, count: 8192), at: 0)
        #expect(!CopyOffload.canClone(from: source, to: target))
        #expect(try CopyOffload.clone(from: source, at: 0, to: target, at: 0, length: 4096) == .unsupported)
        #expect(try target.size() == 0)
        #expect(CopyOffload.blockSize(of: source) == 4096)
    }

    @Test func aReadOnlyTargetIsNotACopyError() throws {
        // copy_file_range into a descriptor opened read-only: EBADF, "cannot here".
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let source = try DiskFile.create(folder.file("a"))
        try source.write(pattern(seed: 6, count: 4096), at: 0)
        _ = try DiskFile.create(folder.file("b"))
        let readOnly = try DiskFile.open(folder.file("b"), access: .readOnly)
        #expect(try CopyOffload.copy(from: source, at: 0, to: readOnly, at: 0, length: 4096) == .unsupported)
    }
}
