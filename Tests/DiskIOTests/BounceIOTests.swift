import DiskIO
import Foundation
import Testing
import TestSupport

/// DiskIO's one bounce path: unaligned requests on an O_DIRECT file read and write exactly the
/// bytes asked for, with or without a caller's bounce buffer, at either start grain.
@Suite struct BounceIOTests {
    @Test(arguments: [BounceStart.offsetAlignment, .bufferAlignment], [false, true])
    func unalignedRequestsOnDirectFiles(start: BounceStart, ownBuffer: Bool) throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = dir.file("f")
        var expected = pattern(seed: 3, count: 40_000)
        try Data(expected).write(to: URL(fileURLWithPath: path))
        let file = try openDirect(path)
        defer { file.close() }
        // A small bounce buffer makes the requests go in several pieces.
        let bounce = ownBuffer ? try AlignedBuffer(byteCount: 8192, for: file) : nil

        let data = pattern(seed: 9, count: 10_001)
        try data.withUnsafeBytes { try file.writeUnaligned($0, at: 1234, start: start, bounce: bounce) }
        expected.replaceSubrange(1234..<(1234 + data.count), with: data)
        #expect(try file.size() >= 40_000)

        var back = [UInt8](repeating: 0, count: 20_003)
        let got = try back.withUnsafeMutableBytes { try file.readUnaligned(into: $0, at: 777, start: start, bounce: bounce) }
        #expect(got == back.count && back == Array(expected[777..<(777 + back.count)]))

        // At the end of the file: only what the file has.
        var tail = [UInt8](repeating: 0xee, count: 1000)
        let short = try tail.withUnsafeMutableBytes { try file.readUnaligned(into: $0, at: 39_500, start: start, bounce: bounce) }
        #expect(short == 500 && Array(tail.prefix(500)) == Array(expected[39_500...]))
        #expect(tail[500...].allSatisfy { $0 == 0xee })
    }

    @Test func alignedRequestsAndBufferedFilesGoStraightThrough() throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = dir.file("f")
        try Data(pattern(seed: 5, count: 8192)).write(to: URL(fileURLWithPath: path))
        let buffered = try DiskFile.open(path, access: .readOnly)
        defer { buffered.close() }
        #expect(buffered.takesAsIs(UnsafeRawPointer(bitPattern: 1), count: 3, offset: 5))
        let direct = try openDirect(path, access: .readOnly)
        defer { direct.close() }
        let aligned = try AlignedBuffer(byteCount: 4096, for: direct)
        #expect(direct.takesAsIs(UnsafeRawPointer(aligned.baseAddress), count: 4096, offset: 4096))
        #expect(!direct.takesAsIs(UnsafeRawPointer(aligned.baseAddress), count: 4096, offset: 100))
        #expect(!direct.takesAsIs(UnsafeRawPointer(aligned.baseAddress + 1), count: 4096, offset: 0))
    }
}
