import DiskIO
import Foundation
import Testing
@testable import ImageFormats
@testable import SimgCLI
import TestSupport

/// A format plugs in with a driver alone: "reversed", a test-only raw format that stores the
/// guest disk back to front, registered from here (for this test's task only), is created,
/// converted to and from with `simg convert`, and shown by `simg info` without SimgCLI or
/// Pipeline knowing it.
@Suite struct FormatPluginTests {
    final class ReversedImage: DiskImage {
        let path: String
        let file: DiskFile
        var dataFile: DiskFile { file }
        let virtualSize: UInt64
        let isWritable: Bool
        var format: ImageFormat { ImageFormat(driver: ReversedDriver()) }
        var backing: (any DiskImage)? { nil }

        init(path: String, file: DiskFile, writable: Bool) throws {
            self.path = path
            self.file = file
            virtualSize = try file.size()
            isWritable = writable
        }

        /// Guest byte g is file byte size - 1 - g.
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
            guard offset + UInt64(buffer.count) <= virtualSize else {
                throw ImageError(path: path, message: "read past the end")
            }
            try file.read(into: buffer, at: virtualSize - offset - UInt64(buffer.count))
            var view = buffer  // the same memory; reversing it in place
            view.reverse()
        }

        func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
            let reversed = [UInt8](data.reversed())
            try file.write(reversed, at: virtualSize - offset - UInt64(data.count))
        }

        func writeZeroes(at offset: UInt64, length: UInt64) throws {
            try file.write([UInt8](repeating: 0, count: Int(length)), at: virtualSize - offset - length)
        }

        func discard(at offset: UInt64, length: UInt64) throws { try writeZeroes(at: offset, length: length) }

        /// Data throughout, with no host offset: the pipeline reads it through `read`.
        func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
            Extent(offset: offset, length: length, kind: .data(hostOffset: nil))
        }

        func flush() throws { try file.sync() }
        func close() throws { file.close() }
        func info() throws -> ImageInfo { ImageInfo(filename: path, format: "reversed", virtualSize: virtualSize) }
    }

    struct ReversedDriver: FormatDriver {
        var name: String { "reversed" }
        var capabilities: FormatCapabilities { [] }
        func probe(header: [UInt8]) -> Int { 0 }
        func open(file: DiskFile, location: ImageLocation, header: [UInt8]?, writable: Bool) throws -> any DiskImage {
            // Convert opens it buffered (writeback source, unsafe target): its reads need no alignment.
            try ReversedImage(path: location.name, file: file, writable: writable)
        }
        var createOptions: [CreateOptionSpec] { [CreateOptionTables.size] }
        func create(_ job: FormatCreateJob) throws {
            let file = try DiskFile.create(job.path)
            defer { file.close() }
            job.created.record(file)
            try file.truncate(to: job.size)
        }
    }

    private func simg(_ arguments: String...) -> (status: Int32, out: String, err: String) { runInProcess(arguments) }

    @Test func aFormatPlugsInThroughItsDriverAlone() throws {
        let folder = try TempDir(prefix: "simg-plugin")
        defer { folder.remove() }
        let dir = folder.path
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        for i in 0..<(64 << 10) { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        for i in (512 << 10)..<(600 << 10) { bytes[i] = UInt8(truncatingIfNeeded: i >> 3) }
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/in.raw"))

        try FormatRegistry.with([ReversedDriver()]) {
            var r = simg("convert", "-f", "raw", "-O", "reversed", dir + "/in.raw", dir + "/r.img")
            #expect(r.status == 0, "\(r.err)")
            // Stored back to front.
            let stored = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/r.img")))
            #expect(stored == Array(bytes.reversed()))
            r = simg("convert", "-f", "reversed", "-O", "qcow2", dir + "/r.img", dir + "/back.qcow2")
            #expect(r.status == 0, "\(r.err)")
            r = simg("convert", "-O", "raw", dir + "/back.qcow2", dir + "/back.raw")
            #expect(r.status == 0, "\(r.err)")
            #expect([UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/back.raw"))) == bytes)
            r = simg("info", "-f", "reversed", dir + "/r.img")
            #expect(r.status == 0 && r.out.contains("file format: reversed\n"), "\(r.out)\(r.err)")
            r = simg("create", "-f", "reversed", dir + "/new.img", "4k")
            #expect(r.status == 0 && r.out.hasPrefix("Formatting '\(dir)/new.img', fmt=reversed size=4096"), "\(r.out)\(r.err)")
            r = simg("check", "-f", "reversed", dir + "/r.img")
            #expect(r.status == 63)
        }
        // Outside, simg does not know it.
        #expect(simg("info", "-f", "reversed", dir + "/r.img").err.contains("Unknown driver 'reversed'"))
    }
}
