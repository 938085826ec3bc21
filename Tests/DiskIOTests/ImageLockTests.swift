import DiskIO
import Glibc
import Foundation
import Testing
import TestSupport

/// QEMU's lock bytes on open file descriptions. Two descriptions in one process conflict just
/// as two processes do (OFD locks belong to the description, not the process), so each test
/// plays both sides with two `DiskFile`s of the same file.
@Suite("ImageLock")
struct ImageLockTests {
    /// A small file to lock in `folder` (which must outlive the test's use of it).
    private func scratchFile(in folder: TempDir) throws -> String {
        let path = folder.file("img")
        let file = try DiskFile.create(path, lock: nil)
        try file.write([UInt8](repeating: 0x5A, count: 4096), at: 0)
        file.close()
        return path
    }

    /// The lock bytes /proc/locks lists for `path`'s inode (OFD read locks, one byte each).
    private func lockedBytes(_ path: String) throws -> [Int] {
        var status = stat()
        #expect(stat(path, &status) == 0)
        let text = try String(contentsOfFile: "/proc/locks", encoding: .utf8)
        var bytes: [Int] = []
        for line in text.split(separator: "\n") {
            // "1: OFDLCK ADVISORY  READ -1 fe:00:16252964 100 100"
            let words = line.split(separator: " ")
            guard words.count >= 8, words[1] == "OFDLCK",
                  words[5].hasSuffix(":\(status.st_ino)"),
                  let start = Int(words[6]), let end = Int(words[7]) else { continue }
            #expect(words[3] == "READ", "simg only takes read locks, as QEMU: \(line)")
            bytes += Array(start...end)
        }
        return bytes.sorted()
    }

    /// `lockedBytes(path)` once it equals `expected`, or what it is after 2 s. (A child
    /// process a parallel test spawns holds copies of our descriptors until its exec, so a
    /// closed description's bytes may linger for a moment.)
    private func settledBytes(_ path: String, _ expected: [Int]) throws -> [Int] {
        let deadline = Date().addingTimeInterval(2)
        var bytes = try lockedBytes(path)
        while bytes != expected && Date() < deadline {
            usleep(5_000)
            bytes = try lockedBytes(path)
        }
        return bytes
    }

    @Test func bytesAreQemus() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let patterns: [(ImageLock, [Int])] = [
            (.reader, [100, 201, 203]),
            (.writer, [100, 101, 103, 201, 203]),
            (.creator, [101, 103, 203]),
            (.forceShare, [100]),
            (.dataFileWriter, [100, 101, 103, 203]),
        ]
        for (lock, bytes) in patterns {
            let file = try DiskFile.open(path, access: .readOnly, lock: lock)
            #expect(try settledBytes(path, bytes) == bytes, "\(lock)")
            file.close()
            #expect(try settledBytes(path, []) == [], "closing drops the locks of \(lock)")
        }
    }

    @Test func readersShare() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let first = try DiskFile.open(path, access: .readOnly, lock: .reader)
        let second = try DiskFile.open(path, access: .readOnly, lock: .reader)
        #expect(try first.lockConflict(.reader) == nil)
        second.close()
        first.close()
    }

    /// Closing a locked file releases its locks at once even while another descriptor shares
    /// its description (as a child another thread forks does until it execs): here a dup.
    @Test func closingReleasesLocksASharedDescriptionStillHolds() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let writer = try DiskFile.open(path, access: .readWrite, lock: .writer)
        let copy = dup(writer.fd)
        #expect(copy >= 0)
        defer { if copy >= 0 { _ = Glibc.close(copy) } }
        writer.close()
        let other = try DiskFile.open(path, access: .readWrite)
        defer { other.close() }
        #expect(try other.lockConflict(.writer) == nil)
    }

    @Test func writerIsRefusedWhileAReaderHoldsTheImage() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let reader = try DiskFile.open(path, access: .readOnly, lock: .reader)
        defer { reader.close() }
        let error = #expect(throws: ImageLockError.self) {
            try DiskFile.open(path, access: .readWrite, lock: .writer)
        }
        // Held "consistent read" is fine (byte 200 is free); held "write" meets the reader's
        // byte 201 first, as QEMU checks held permissions before unshared ones.
        #expect(error == ImageLockError(path: path, permission: "write", shared: false))
        #expect(error?.description == "Failed to get \"write\" lock\nIs another process using the image [\(path)]?")
        // The refused open left no byte behind: only the reader's remain.
        #expect(try settledBytes(path, [100, 201, 203]) == [100, 201, 203])
    }

    @Test func readerIsRefusedWhileAWriterHoldsTheImage() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let writer = try DiskFile.open(path, access: .readWrite, lock: .writer)
        let error = #expect(throws: ImageLockError.self) {
            try DiskFile.open(path, access: .readOnly, lock: .reader)
        }
        #expect(error?.description == "Failed to get shared \"write\" lock\nIs another process using the image [\(path)]?")
        #expect(try settledBytes(path, [100, 101, 103, 201, 203]) == [100, 101, 103, 201, 203])
        // Once the writer is gone the reader gets in.
        writer.close()
        let reader = try DiskFile.open(path, access: .readOnly, lock: .reader)
        reader.close()
    }

    @Test func forceShareNeitherBlocksNorIsBlocked() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let writer = try DiskFile.open(path, access: .readWrite, lock: .writer)
        let shared = try DiskFile.open(path, access: .readOnly, lock: .forceShare)
        writer.close()
        // A -U reader holds only byte 100: a writer may still come.
        let second = try DiskFile.open(path, access: .readWrite, lock: .writer)
        second.close()
        shared.close()
    }

    @Test func twoWritersConflict() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let writer = try DiskFile.open(path, access: .readWrite, lock: .writer)
        defer { writer.close() }
        let error = #expect(throws: ImageLockError.self) {
            try DiskFile.open(path, access: .readWrite, lock: .writer)
        }
        #expect(error?.permission == "write")
        #expect(error?.shared == false)
    }

    @Test func createOverAnImageInUseLeavesItIntact() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let reader = try DiskFile.open(path, access: .readOnly, lock: .reader)
        defer { reader.close() }
        let error = #expect(throws: ImageLockError.self) { try DiskFile.create(path) }
        #expect(error?.permission == "write")
        // Locked before truncating: the file still has its 4096 bytes of 0x5A.
        #expect(try reader.size() == 4096)
        #expect(try reader.readBytes(count: 4096, at: 0).allSatisfy { $0 == 0x5A })
    }

    @Test func createTruncatesAndHoldsTheCreatorsLock() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = try scratchFile(in: folder)
        defer { withExtendedLifetime(folder) {} }
        let created = try DiskFile.create(path)
        #expect(try created.size() == 0)
        #expect(try settledBytes(path, [101, 103, 203]) == [101, 103, 203])
        let error = #expect(throws: ImageLockError.self) {
            try DiskFile.open(path, access: .readOnly, lock: .reader)
        }
        #expect(error?.shared == true)
        created.close()
    }
}
