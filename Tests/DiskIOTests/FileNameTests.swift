import DiskIO
import Glibc
import Testing
import TestSupport

@Suite("File names as bytes")
struct FileNameTests {
    /// Every byte string survives bytes -> String -> bytes, whatever it holds: ASCII, valid
    /// UTF-8, invalid bytes, and valid encodings of the escape range itself.
    @Test func roundTripsAnyBytes() {
        var generator = SystemRandomNumberGenerator()
        let samples: [[UInt8]] = [
            Array("plain.qcow2".utf8), Array("caf\u{E9} \u{1F600}".utf8), [0x62, 0xFF, 0x2E],
            [0xE2, 0x82], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80],
            Array("\u{10FF80}\u{10FFFF}x".utf8), [0x80, 0xBF, 0xFE],
        ] + (0..<500).map { _ in (0..<Int.random(in: 1...24, using: &generator)).map { _ in UInt8.random(in: 1...255, using: &generator) } }
        for bytes in samples {
            let name = FileName.decode(bytes)
            #expect(FileName.bytes(of: name) == bytes)
            #expect(FileName.byteCount(name) == bytes.count)
            let viaC = FileName.withCString(name) { pointer in
                (0..<bytes.count).map { UInt8(bitPattern: pointer[$0]) } + [UInt8(bitPattern: pointer[bytes.count])]
            }
            #expect(viaC == bytes + [0])
        }
    }

    /// Valid UTF-8 decodes to the same String Swift gives, with no escapes.
    @Test func validUTF8IsPlainText() {
        for text in ["disk.qcow2", "Über/日本語.img", "a\u{1F600}b"] {
            #expect(FileName.decode(Array(text.utf8)) == text)
            #expect(!FileName.hasEscapes(text))
            #expect(FileName.bytes(of: text) == Array(text.utf8))
        }
        #expect(FileName.hasEscapes(FileName.decode([0x61, 0xFF])))
    }

    /// A name that is not UTF-8 reaches open(2) whole: a file made under it opens, and the
    /// U+FFFD spelling of it does not exist.
    @Test func opensTheFileOfThoseBytes() throws {
        let dir = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let name = dir.path + "/" + FileName.decode([0x62, 0x61, 0x64, 0xFF])
        let created = try DiskFile.create(name, lock: nil)
        created.close()
        let opened = try DiskFile.open(name, access: .readOnly)
        opened.close()
        #expect(FileStatus(name)?.kind == .regular)
        #expect(FileStatus(dir.path + "/bad\u{FFFD}") == nil)
        // Removed by its bytes: the folder's cleanup (FileManager) only knows String names.
        #expect(FileName.withCString(name) { unlink($0) } == 0)
    }
}
