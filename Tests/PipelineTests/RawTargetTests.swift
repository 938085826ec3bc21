import DiskIO
import Foundation
import Glibc
import ImageFormats
@testable import Pipeline
import Testing
import TestSupport

@Suite("raw target")
struct RawTargetTests {
    /// The unaligned tail of an O_DIRECT target goes through a second, buffered descriptor.
    /// It must reach the file the target opened even after that file was renamed and another
    /// took its name (opening the name again would write into the newcomer).
    @Test func unalignedTailReachesTheOpenedFile() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let path = dir.file("out.raw"), moved = dir.file("moved.raw")
        let size: UInt64 = (1 << 20) + 100
        try pipelineFile(path, size: size, pieces: [])
        let target = ImageTarget(image: try RawImage.open(path: path, writable: true, cache: .none), startsZeroed: false)
        #expect(target.isDirect)
        #expect(rename(path, moved) == 0)
        try pipelineFile(path, size: size, pieces: [])

        let bytes = pipelinePattern(4096 + 100, seed: 5)
        let buffer = try AlignedBuffer(byteCount: bytes.count)
        // Sound: the buffer holds at least bytes.count bytes.
        bytes.withUnsafeBytes { buffer.baseAddress.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        try target.write(UnsafeRawBufferPointer(start: buffer.baseAddress, count: bytes.count), at: (1 << 20) - 4096)
        try target.finish()

        let original = try DiskFile.open(moved, access: .readOnly)
        defer { original.close() }
        #expect(try original.readBytes(count: bytes.count, at: (1 << 20) - 4096) == bytes)
        let newcomer = try DiskFile.open(path, access: .readOnly)
        defer { newcomer.close() }
        #expect(try newcomer.readBytes(count: Int(size), at: 0).allSatisfy { $0 == 0 })
    }

    /// A device is never "fresh": its old bytes are there, so zeros must be written.
    @Test func deviceTargetDoesNotStartZeroed() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let null = dir.file("null")
        #expect(mknod(null, S_IFCHR | 0o600, dev_t((1 << 8) | 3)) == 0, "mknod: \(String(cString: strerror(errno)))")
        let target = ImageTarget(image: try RawImage.open(path: null, writable: true, cache: .writeback), startsZeroed: true)
        #expect(!target.readsAsZero(at: 0, length: 512))
        #expect(!target.readsAsZero(at: 1 << 20, length: 512))
        target.abandon()
        let assumed = ImageTarget(image: try RawImage.open(path: null, writable: true, cache: .writeback),
                                  startsZeroed: true, assumeZero: true)
        #expect(assumed.readsAsZero(at: 0, length: 512))  // --target-is-zero: the user says so
        assumed.abandon()
        var status = stat()
        #expect(lstat(null, &status) == 0 && status.st_mode & S_IFMT == S_IFCHR)
    }
}
