import DiskIO
import Foundation
import Glibc
import Testing
import TestSupport

@Suite("Small files read whole")
struct SmallFileTests {
    @Test func readsWholeFilesUpToTheLimit() throws {
        let dir = try TempDir()
        let bytes = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try Data(bytes).write(to: URL(fileURLWithPath: dir.file("s")))
        #expect(try SmallFile.read(dir.file("s"), limit: 100_000) == bytes)
        #expect(throws: SmallFile.Failure.tooLarge(limit: 99_999)) { try SmallFile.read(dir.file("s"), limit: 99_999) }
        try Data().write(to: URL(fileURLWithPath: dir.file("empty")))
        #expect(try SmallFile.read(dir.file("empty"), limit: 1) == [])
    }

    @Test func failuresCarryTheErrno() throws {
        let dir = try TempDir()
        #expect(throws: SmallFile.Failure.open(ENOENT)) { try SmallFile.read(dir.file("missing"), limit: 10) }
        #expect(throws: SmallFile.Failure.read(EISDIR)) { try SmallFile.read(dir.path, limit: 10) }
        // An endless file stops at the limit instead of filling memory.
        #expect(throws: SmallFile.Failure.tooLarge(limit: 1 << 20)) { try SmallFile.read("/dev/zero", limit: 1 << 20) }
    }
}
