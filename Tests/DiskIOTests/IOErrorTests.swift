import DiskIO
import Foundation
import Testing
import TestSupport

/// Callers tell failures apart by `IOError.operation`; the messages keep the words they had
/// when the operation was a string (qemu-img interop tests compare them byte for byte).
@Suite("IOError")
struct IOErrorTests {
    @Test func everyOperationKeepsItsWords() {
        let words: [(IOError.Operation, String)] = [
            (.open, "open"), (.create, "create"), (.reopen, "reopen"), (.read, "read"), (.write, "write"),
            (.stat, "stat"), (.truncate, "truncate"), (.sync, "sync"), (.lock, "lock"),
            (.allocate, "allocate space in"), (.punchHole, "punch a hole in"), (.zeroRange, "zero a range of"),
            (.findData, "find data in"), (.findHole, "find a hole in"),
            (.setUpAIO, "set up a Linux AIO context for"), (.waitForAIO, "wait for Linux AIO completions from"),
        ]
        for (operation, text) in words {
            let error = IOError(code: EIO, operation: operation, path: "x.img", offset: 512)
            #expect(error.description == "Could not \(text) 'x.img' at offset 512: Input/output error")
        }
    }

    @Test func failuresCarryTheOperationThatFailed() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let missing = folder.file("missing")
        let open = #expect(throws: IOError.self) { try DiskFile.open(missing, access: .readOnly) }
        #expect(open?.operation == .open)
        #expect(open?.code == ENOENT)

        let path = folder.file("short")
        let file = try DiskFile.create(path)
        defer { file.close() }
        #expect((#expect(throws: IOError.self) { try DiskFile.create(path, exclusive: true) })?.operation == .create)
        var buffer = [UInt8](repeating: 0, count: 16)
        let read = #expect(throws: IOError.self) {
            try buffer.withUnsafeMutableBytes { try file.readExactly(into: $0, at: 0) }
        }
        #expect(read?.operation == .read)
        let past = #expect(throws: IOError.self) { try file.truncate(to: UInt64(Int64.max) + 1) }
        #expect(past?.operation == .truncate)
    }
}
