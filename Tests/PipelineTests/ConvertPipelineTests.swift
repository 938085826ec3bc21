import DiskIO
import Glibc
import ImageFormats
import Testing
@testable import Pipeline
import TestSupport

@Suite("convert pipeline") struct ConvertPipelineTests {
    /// A raw file: 64 data pieces of 4 KiB separated by 4 KiB holes, then 256 KiB of written
    /// zeros, then 100 KiB of data, in 2 MiB.
    func fragmentedRaw(_ dir: TempDir) throws -> (path: String, expected: [UInt8]) {
        var pieces: [(offset: UInt64, bytes: [UInt8])] = []
        for i in 0..<64 { pieces.append((UInt64(i) * 8192, pipelinePattern(4096, seed: UInt8(i)))) }
        pieces.append((1 << 20, [UInt8](repeating: 0, count: 256 << 10)))
        pieces.append((1_500_000, pipelinePattern(100_000, seed: 99)))
        let path = dir.file("frag.raw")
        try pipelineFile(path, size: 2 << 20, pieces: pieces)
        var expected = [UInt8](repeating: 0, count: 2 << 20)
        for piece in pieces { expected.replaceSubrange(Int(piece.offset)..<(Int(piece.offset) + piece.bytes.count), with: piece.bytes) }
        return (path, expected)
    }

    func convert(_ path: String, into target: MemoryTarget, _ configure: (inout ConvertOptions) -> Void = { _ in },
                 direct: Bool = false) throws -> ConvertStats {
        let source = try RawImage.open(path: path, writable: false, cache: direct ? .none : .writeback)
        defer { try? source.close() }
        var options = ConvertOptions()
        configure(&options)
        return try ConvertPipeline(sources: [source], target: target, options: options).run()
    }

    @Test("adjacent data extents of one file are read with one request; holes are not written",
          arguments: [false, true])
    func mergesAndSkips(direct: Bool) throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (path, expected) = try fragmentedRaw(dir)
        let target = MemoryTarget(size: 2 << 20)
        let stats = try convert(path, into: target, direct: direct)
        #expect(target.bytes == expected)
        #expect(target.finished)
        #expect(stats.extentsMerged >= 63)
        // One request for the 64 pieces (the 4 KiB holes between them are filled), one for the
        // zeros (allocated data), one for the tail.
        #expect(stats.readRequests <= 3)
        // 64 granules of 4 KiB, plus the 25 granules the 100,000 bytes at 1,500,000 touch.
        #expect(stats.bytesWritten == 89 * 4096)
        #expect(stats.bytesZeroSkipped >= 256 << 10)
        // Only non-zero granules were written.
        for write in target.writes {
            let slice = target.bytes[Int(write.offset)..<(Int(write.offset) + write.length)]
            #expect(slice.contains { $0 != 0 })
        }
        #expect(stats.engine == (direct ? "linux-aio" : "thread-pool") || stats.engine == "thread-pool")
    }

    @Test("a target that does not read as zeros gets the zero ranges zeroed")
    func zeroesExistingTarget() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (path, expected) = try fragmentedRaw(dir)
        let target = MemoryTarget(size: 2 << 20, startsZeroed: false, fill: 0xee)
        let stats = try convert(path, into: target)
        #expect(target.bytes == expected)
        #expect(!target.zeroes.isEmpty)
        #expect(stats.bytesZeroWritten > 0)
        #expect(stats.bytesZeroSkipped == 0)
    }

    @Test("-S 0 writes everything; a larger -S leaves fewer, larger zero ranges")
    func sparseSize() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (path, expected) = try fragmentedRaw(dir)
        let full = MemoryTarget(size: 2 << 20)
        let stats = try convert(path, into: full) { $0.sparseSize = 0 }
        #expect(full.bytes == expected)
        #expect(stats.bytesWritten == 2 << 20)
        #expect(stats.bytesZeroSkipped == 0)

        let coarse = MemoryTarget(size: 2 << 20)
        let coarseStats = try convert(path, into: coarse) { $0.sparseSize = 64 << 10 }
        #expect(coarse.bytes == expected)
        for write in coarse.writes { #expect(write.offset % (64 << 10) == 0) }
        #expect(coarseStats.bytesWritten >= 512 << 10)
    }

    @Test("writes start on the target's granularity and come in guest order")
    func granularityAndOrder() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (path, expected) = try fragmentedRaw(dir)
        let target = MemoryTarget(size: 2 << 20, granularity: 65536)
        _ = try convert(path, into: target) {
            $0.bufferSize = 128 << 10
            $0.queueDepth = 3
        }
        #expect(target.bytes == expected)
        var last: UInt64 = 0
        for write in target.writes {
            #expect(write.offset % 65536 == 0)
            #expect(write.length % 65536 == 0 || write.offset + UInt64(write.length) == 2 << 20)
            #expect(write.offset >= last)
            last = write.offset + UInt64(write.length)
        }
    }

    @Test("small buffers and a shallow queue still copy everything", arguments: [1, 2, 7])
    func smallQueue(depth: Int) throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let data = pipelinePattern(3_000_000, seed: 5)
        let path = dir.file("dense.raw")
        try pipelineFile(path, size: 3_000_320, pieces: [(0, data)])
        let target = MemoryTarget(size: 3_000_320)
        let stats = try convert(path, into: target) {
            $0.bufferSize = 4096
            $0.queueDepth = depth
        }
        #expect(Array(target.bytes.prefix(3_000_000)) == data)
        #expect(target.bytes.suffix(320).allSatisfy { $0 == 0 })
        #expect(stats.readRequests >= 3_000_000 / 4096)
    }

    /// QEMU's file driver pads a read that meets the end of the file with zeros, so a data
    /// extent running past the end of a truncated image's file converts as zeros there (with or
    /// without --salvage), as qemu-img converts it. The target is pre-filled so the zeros must
    /// be put there by the copy.
    @Test("a source file shorter than its data extents reads as zeros past its end")
    func truncatedRead() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let data = pipelinePattern(64 << 10, seed: 1)
        try pipelineFile(dir.file("short"), size: 64 << 10, pieces: [(0, data)])
        let file = try DiskFile.open(dir.file("short"), access: .readOnly)
        let image = FakeImage(path: "img", size: 1 << 20, dataFile: file,
                              extents: [Extent(offset: 0, length: 1 << 20, kind: .data(hostOffset: 0))])
        let target = MemoryTarget(size: 1 << 20, startsZeroed: false, fill: 0xAA)
        let pipeline = try ConvertPipeline(sources: [image], target: target, options: ConvertOptions())
        try pipeline.run()
        #expect(Array(target.bytes.prefix(64 << 10)) == data)
        #expect(target.bytes.dropFirst(64 << 10).allSatisfy { $0 == 0 })
        #expect(target.finished)
    }

    @Test("compressed and host-less extents are read through the image")
    func readsThroughImage() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        try pipelineFile(dir.file("f"), size: 4096, pieces: [])
        let image = FakeImage(path: "img", size: 256 << 10, dataFile: try DiskFile.open(dir.file("f"), access: .readOnly),
                              extents: [Extent(offset: 0, length: 128 << 10, kind: .compressed(hostOffset: 0, length: 4096)),
                                        Extent(offset: 128 << 10, length: 128 << 10, kind: .data(hostOffset: nil))],
                              content: { UInt8(truncatingIfNeeded: $0 / 4096 + 1) })
        let target = MemoryTarget(size: 256 << 10)
        let stats = try ConvertPipeline(sources: [image], target: target, options: ConvertOptions()).run()
        #expect(target.bytes.enumerated().allSatisfy { $0.element == UInt8(truncatingIfNeeded: $0.offset / 4096 + 1) })
        #expect(stats.readRequests == 2)
    }

    @Test("--stats JSON names every counter")
    func statsJSON() {
        var stats = ConvertStats()
        stats.engine = "linux-aio"
        stats.readRequests = 3
        stats.seconds = 0.25
        let json = stats.json
        for key in ["\"engine\": \"linux-aio\"", "\"read-requests\": 3", "\"write-requests\": 0", "\"extents-merged\": 0",
                    "\"bytes-read\": 0", "\"bytes-written\": 0", "\"bytes-zero-skipped\": 0", "\"seconds\": 0.250000"] {
            #expect(json.contains(key), "\(key) in \(json)")
        }
    }
}

@Suite("convert pipeline errors") struct ConvertPipelineErrorTests {
    @Test("a write failing in flight (ENOSPC on /dev/full) names the target and the byte")
    func asyncWriteFailure() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let path = dir.file("data.raw")
        try pipelineFile(path, size: 1 << 20, pieces: [(0, pipelinePattern(1 << 20, seed: 3))])
        let source = try RawImage.open(path: path, writable: false, cache: .writeback)
        defer { try? source.close() }
        let target = ImageTarget(image: try RawImage.open(path: "/dev/full", writable: true, cache: .writeback), startsZeroed: true)
        var options = ConvertOptions()
        options.bufferSize = 256 << 10
        do {
            try ConvertPipeline(sources: [source], target: target, options: options).run()
            Issue.record("writing to /dev/full succeeded")
        } catch let error as ConvertError {
            #expect(error.operation == .writing)
            #expect(error.path == "/dev/full")
            #expect(error.byte % (256 << 10) == 0)
            #expect(error.description.hasPrefix("error while writing at byte \(error.byte): "))
            #expect(error.description.contains("/dev/full") && error.description.contains("No space left on device"))
        }
    }

    @Test("a synchronous target write failing stops the copy with the byte")
    func syncWriteFailure() throws {
        final class FailingTarget: ConvertTarget {
            let path = "failing"
            let virtualSize: UInt64 = 1 << 20
            let writeGranularity = 1
            var isDirect: Bool { false }
            var writesAsynchronously: Bool { false }
            var abandoned = false
            var writes = 0
            func readsAsZero(at offset: UInt64, length: UInt64) -> Bool { true }
            func asyncDestination(forWriteAt offset: UInt64, length: Int) -> (endpoint: any BlockEndpoint, offset: UInt64)? { nil }
            func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
                writes += 1
                if offset >= 512 << 10 { throw IOError(code: EIO, operation: .write, path: "failing", offset: offset) }
            }
            func writeZeroes(at offset: UInt64, length: UInt64) throws {}
            func finish() throws { Issue.record("finished after an error") }
            func abandon() { abandoned = true }
        }
        let dir = try TempDir(prefix: "simg-pipeline")
        let path = dir.file("data.raw")
        try pipelineFile(path, size: 1 << 20, pieces: [(0, pipelinePattern(1 << 20, seed: 4))])
        let source = try RawImage.open(path: path, writable: false, cache: .writeback)
        defer { try? source.close() }
        let target = FailingTarget()
        var options = ConvertOptions()
        options.bufferSize = 128 << 10
        #expect(throws: ConvertError.self) { try ConvertPipeline(sources: [source], target: target, options: options).run() }
        #expect(target.abandoned)
        #expect(target.writes == 5)
    }
}

/// The context a pipeline request carries in its engine tag comes back as it went in, at the
/// edges of every field (a chunk is at most 2^30 bytes, so an op index or a position is below it).
@Suite("convert pipeline request context") struct ConvertPipelineRequestContextTests {
    typealias Context = ConvertPipeline.RequestContext

    @Test(arguments: [0, 1, 7, 0xffff_ffff])
    func roundTripsThroughTheTag(slot: Int) {
        for index in [0, 1, 4096, (1 << 30) - 1] {
            let read = Context.read(slot: slot, op: index), write = Context.write(slot: slot, position: index)
            #expect(Context(tag: read.tag) == read)
            #expect(Context(tag: write.tag) == write)
            #expect(read.tag != write.tag)
        }
    }
}
