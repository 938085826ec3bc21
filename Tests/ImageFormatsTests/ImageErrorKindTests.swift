import DiskIO
import Foundation
import ImageFormats
import Testing
import TestSupport

/// The kinds callers branch on (SimgCLI words each failure as qemu-img does) are the kinds
/// the library's failures carry: a representative failure of each, through the public API.
@Suite("ImageError kinds")
struct ImageErrorKindTests {
    private func create(_ path: String, _ options: [CreateOption] = [], backing: String? = nil) throws {
        try ImageCreator.create(CreateRequest(format: .qcow2, path: path, size: 1 << 20, options: options,
                                              backingFile: backing, backingFormat: backing == nil ? nil : "qcow2",
                                              unsafeBacking: true)) { _ in }
    }

    private func openFailure(_ path: String, _ options: OpenOptions = OpenOptions()) -> ImageError? {
        #expect(throws: ImageError.self) { try ImageOpener.open(path, options: options).close() }
    }

    @Test func aMissingBackingFileTwoLevelsDownIsOneBackingFailurePerLevel() throws {
        let folder = try TempDir(prefix: "simg-raw", in: .varTmp)
        let (top, mid) = (folder.file("top.qcow2"), folder.file("mid.qcow2"))
        try create(mid, backing: folder.file("gone.qcow2"))
        try create(top, backing: mid)
        let error = try #require(openFailure(top))
        #expect(error.kind == .backingFileOpen)
        #expect(error.path == top)
        let below = try #require(error.cause as? ImageError)
        #expect(below.kind == .backingFileOpen)
        #expect(below.path == mid)
        #expect(!ImageOpener.failedOnLock(error))
    }

    @Test func aMissingDataFile() throws {
        let folder = try TempDir(prefix: "simg-raw", in: .varTmp)
        let (path, data) = (folder.file("d.qcow2"), folder.file("d.raw"))
        try create(path, [CreateOption(name: "data_file", value: data)])
        try FileManager.default.removeItem(atPath: data)
        let error = try #require(openFailure(path))
        #expect(error.kind == .dataFileOpen)
        #expect((error.cause as? IOError)?.operation == .open)
    }

    @Test func anUnreadableSnapshotTable() throws {
        let folder = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = folder.file("s.qcow2")
        try create(path)
        // nb_snapshots (header offset 60) one past QEMU's limit of 65536.
        let file = try DiskFile.open(path, access: .readWrite)
        try file.write([0x00, 0x01, 0x00, 0x01], at: 60)
        file.close()
        let error = try #require(openFailure(path))
        #expect(error.kind == .snapshotTable)
        #expect(error.cause == nil)
    }

    @Test func aLockConflict() throws {
        let folder = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = folder.file("l.qcow2")
        try create(path)
        let writer = try ImageOpener.open(path, options: OpenOptions(writable: true))
        defer { try? writer.close() }
        let error = try #require(openFailure(path, OpenOptions(writable: true)))
        #expect(error.kind == .lockConflict)
        #expect(ImageOpener.failedOnLock(error))
    }

    @Test func createOptions() throws {
        let folder = try TempDir(prefix: "simg-raw", in: .varTmp)
        let unknown = #expect(throws: ImageError.self) {
            try create(folder.file("u.qcow2"), [CreateOption(name: "foo", value: "bar")])
        }
        #expect(unknown?.kind == .invalidParameter)
        #expect(unknown?.message == "Invalid parameter 'foo'")
        // A bad value for an option the format has is not that (convert names the file for it).
        let badValue = #expect(throws: ImageError.self) {
            try create(folder.file("v.qcow2"), [CreateOption(name: "lazy_refcounts", value: "maybe")])
        }
        #expect(badValue?.kind == .general)
        // A file that cannot be created: the IOError says so by its operation.
        let uncreatable = #expect(throws: ImageError.self) { try create(folder.file("no/such/folder.qcow2")) }
        #expect((uncreatable?.cause as? IOError)?.operation == .create)
    }
}
