import DiskIO
import Foundation
import Testing
@testable import ImageFormats
import TestSupport

/// What the recording driver was handed (one test at a time uses it: the suite is serialized).
nonisolated(unsafe) private var handed: (file: DiskFile, header: [UInt8]?)?

/// A test-only format claiming files that start with "RAWX": it records the open file and the
/// header the opener gives it, and reads the file as raw (the image says "raw").
private struct RecordingDriver: FormatDriver {
    var name: String { "rawx" }
    var capabilities: FormatCapabilities { [] }
    func probe(header: [UInt8]) -> Int { header.starts(with: Array("RAWX".utf8)) ? 100 : 0 }
    func open(file: DiskFile, location: ImageLocation, header: [UInt8]?, writable: Bool) throws -> any DiskImage {
        handed = (file, header)
        return try RawImage.open(path: location.name, file: file)
    }
    var createOptions: [CreateOptionSpec] { [] }
    func create(_ job: FormatCreateJob) throws {}
}

/// The opener opens an image's file once: it probes from the descriptor it then hands the
/// driver, opened with the access and O_DIRECT flag asked for, together with the header read.
@Suite(.serialized) struct OpenOnceTests {
    @Test(arguments: [false, true])
    func probedFileAndHeaderReachTheDriver(direct: Bool) throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = dir.file("x.img")
        let bytes = Array("RAWX".utf8) + pattern(seed: 7, count: 8188)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        try FormatRegistry.with([RecordingDriver()]) {
            handed = nil
            let image = try ImageOpener.open(path, options: OpenOptions(writable: true, cache: direct ? .none : .writeback, locking: .none))
            defer { try? image.close() }
            let got = try #require(handed)
            #expect(got.file === image.file)
            #expect(got.file.access == .readWrite && got.file.isDirect == direct)
            #expect(got.header == Array(bytes.prefix(512)))
        }
    }

    @Test func namedFormatGetsNoHeader() throws {
        let dir = try TempDir()
        let path = dir.file("x.img")
        try Data(Array("RAWX".utf8) + [UInt8](repeating: 1, count: 1020)).write(to: URL(fileURLWithPath: path))
        try FormatRegistry.with([RecordingDriver()]) {
            handed = nil
            let format = try #require(ImageFormat(rawValue: "rawx"))
            let image = try ImageOpener.open(path, options: OpenOptions(format: format, locking: .none))
            defer { try? image.close() }
            let got = try #require(handed)
            #expect(got.file === image.file && got.file.access == .readOnly && got.header == nil)
        }
    }
}
