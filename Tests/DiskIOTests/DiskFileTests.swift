import DiskIO
import Foundation
import Testing
import TestSupport

@Suite("DiskFile")
struct DiskFileTests {
    @Test func shortReadAtEndOfFile() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let file = try DiskFile.create(folder.file("a"))
        try file.write(pattern(seed: 1, count: 1000), at: 0)
        var buffer = [UInt8](repeating: 0xAA, count: 600)
        let n = try buffer.withUnsafeMutableBytes { try file.read(into: $0, at: 700) }
        #expect(n == 300)
        #expect(Array(buffer[0..<300]) == Array(pattern(seed: 1, count: 1000)[700..<1000]))
        #expect(buffer[300] == 0xAA)  // untouched past the end
        let past = try buffer.withUnsafeMutableBytes { try file.read(into: $0, at: 5000) }
        #expect(past == 0)
        // readBytes zero-fills past the end.
        #expect(try file.readBytes(count: 4, at: 998) == [pattern(seed: 1, count: 1000)[998], pattern(seed: 1, count: 1000)[999], 0, 0])
    }

    @Test func readExactlyFailsAtEndOfFile() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = folder.file("b")
        let file = try DiskFile.create(path)
        try file.write([UInt8](repeating: 7, count: 100), at: 0)
        var buffer = [UInt8](repeating: 0, count: 64)
        try buffer.withUnsafeMutableBytes { try file.readExactly(into: $0, at: 36) }
        #expect(buffer.allSatisfy { $0 == 7 })
        let error = #expect(throws: IOError.self) {
            try buffer.withUnsafeMutableBytes { try file.readExactly(into: $0, at: 50) }
        }
        #expect(error?.path == path)
        #expect(error?.offset == 100)
        #expect(error?.description.contains("unexpected end of file") == true)
    }

    @Test func punchHoleThenSeekDataAndHole() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let file = try DiskFile.create(folder.file("c"))
        let mib = 1 << 20
        try file.write([UInt8](repeating: 0x55, count: 4 * mib), at: 0)
        try file.sync()
        try file.punchHole(at: UInt64(mib), length: UInt64(2 * mib))
        #expect(try file.size() == UInt64(4 * mib))
        #expect(try file.nextData(from: 0) == 0)
        #expect(try file.nextHole(from: 0) == UInt64(mib))
        #expect(try file.nextData(from: UInt64(mib)) == UInt64(3 * mib))
        #expect(try file.nextHole(from: UInt64(3 * mib)) == UInt64(4 * mib))  // end of file
        let hole = try file.readBytes(count: 4096, at: UInt64(mib) + 4096)
        #expect(hole.allSatisfy { $0 == 0 })
        // The hole really is unallocated: about 2 MiB of the 4 MiB remain.
        let allocated = try file.allocatedBytes()
        #expect(allocated >= UInt64(2 * mib) && allocated < UInt64(3 * mib))
    }

    @Test func nextDataPastLastDataIsNil() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let file = try DiskFile.create(folder.file("d"))
        try file.write([1, 2, 3], at: 0)
        try file.truncate(to: 8 << 20)
        #expect(try file.nextData(from: 1 << 20) == nil)
    }

    @Test func truncateGrowsAndShrinks() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let file = try DiskFile.create(folder.file("e"))
        try file.truncate(to: 10 << 20)
        #expect(try file.size() == 10 << 20)
        #expect(try file.allocatedBytes() == 0)  // sparse
        try file.write([9, 9, 9], at: 5)
        try file.truncate(to: 6)
        #expect(try file.size() == 6)
        #expect(try file.readBytes(count: 8, at: 0) == [0, 0, 0, 0, 0, 9, 0, 0])
    }

    @Test func allocateAndZeroRange() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let file = try DiskFile.create(folder.file("f"))
        try file.allocate(at: 0, length: 1 << 20)
        #expect(try file.size() == 1 << 20)
        #expect(try file.allocatedBytes() >= 1 << 20)
        try file.write([UInt8](repeating: 0xFF, count: 8192), at: 0)
        try file.zeroRange(at: 0, length: 8192)
        #expect(try file.readBytes(count: 8192, at: 0).allSatisfy { $0 == 0 })
        #expect(try file.allocatedBytes() >= 1 << 20)  // zero-range keeps the blocks
    }

    /// The calls taking an off_t (ftruncate, fallocate, lseek) check their UInt64 offset and
    /// length as read and write do: past 2^63 - 1 is an IOError naming the file and what was
    /// being done, not a trap converting it to Int64; the file is left as it was.
    enum HugeOperation: String, CaseIterable, CustomTestStringConvertible {
        case truncate, allocate, punchHole, zeroRange, nextData, nextHole, read, write
        var testDescription: String { rawValue }

        var words: String {
            switch self {
            case .truncate: return "truncate"
            case .allocate: return "allocate space in"
            case .punchHole: return "punch a hole in"
            case .zeroRange: return "zero a range of"
            case .nextData: return "find data in"
            case .nextHole: return "find a hole in"
            case .read: return "read"
            case .write: return "write"
            }
        }

        /// Performs the operation at `offset`, over `length` bytes where it takes a length.
        func run(_ file: DiskFile, offset: UInt64, length: UInt64) throws {
            switch self {
            case .truncate: try file.truncate(to: offset)
            case .allocate: try file.allocate(at: offset, length: length)
            case .punchHole: try file.punchHole(at: offset, length: length)
            case .zeroRange: try file.zeroRange(at: offset, length: length)
            case .nextData: _ = try file.nextData(from: offset)
            case .nextHole: _ = try file.nextHole(from: offset)
            case .read: _ = try file.readBytes(count: 16, at: offset)
            case .write: try file.write([UInt8](repeating: 1, count: 16), at: offset)
            }
        }

        var takesLength: Bool { self == .allocate || self == .punchHole || self == .zeroRange }
    }

    @Test(arguments: HugeOperation.allCases)
    func offsetPastTheLargestFileOffsetIsAnError(_ operation: HugeOperation) throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = folder.file("huge")
        let file = try DiskFile.create(path)
        try file.write([UInt8](repeating: 0x33, count: 8192), at: 0)
        for offset in [UInt64(Int64.max) + 1, UInt64.max] {
            let error = #expect(throws: IOError.self) { try operation.run(file, offset: offset, length: 4096) }
            #expect(error?.path == path)
            #expect(error?.offset == offset)
            #expect(error?.description == "Could not \(operation.words) '\(path)' at offset \(offset): "
                    + "offset is past the largest file offset")
        }
        if operation.takesLength {
            // The offset fits, the end does not: a length of 2^63 or more, or one that carries
            // the end past 2^63 - 1.
            for (offset, length) in [(UInt64(0), UInt64(Int64.max) + 1), (4096, UInt64.max),
                                     (UInt64(Int64.max) - 4095, 8192)] {
                let error = #expect(throws: IOError.self) { try operation.run(file, offset: offset, length: length) }
                #expect(error?.path == path)
                #expect(error?.description == "Could not \(operation.words) '\(path)' at offset \(offset): "
                        + "a range of \(length) bytes ends past the largest file offset")
            }
        }
        #expect(try file.size() == 8192)
        #expect(try file.readBytes(count: 8192, at: 0).allSatisfy { $0 == 0x33 })
    }

    @Test func openMissingFileNamesIt() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = folder.file("missing")
        let error = #expect(throws: IOError.self) { try DiskFile.open(path, access: .readOnly) }
        #expect(error?.code == ENOENT)
        #expect(error?.description == "Could not open '\(path)': No such file or directory")
    }
}
