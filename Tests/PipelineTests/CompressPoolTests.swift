import DiskIO
import Foundation
import ImageFormats
import Testing
@testable import Pipeline
import TestSupport

/// The parallel compressor (order, padding, incompressible clusters) and the compressing
/// qcow2 target end to end (checked by qemu-img check and compare).
@Suite struct CompressPoolTests {
    static func cluster(_ index: Int, size: Int, randomFraction: Double) -> [UInt8] {
        compressibleBytes(size: size, seed: UInt64(index + 7), randomFraction: randomFraction,
                          text: "pool test cluster \(index) ")
    }

    @Test(arguments: [(QCOW2Compression.zlib, 1), (.zlib, 3), (.zstd, 4)])
    func resultsInOrder(_ codec: QCOW2Compression, _ threads: Int) throws {
        let cs = 65536
        let pool = try CompressPool(clusterSize: cs, threads: threads) { try QCOW2ClusterCompressor(codec: codec, clusterSize: cs) }
        defer { pool.stop() }
        let count = 3 * pool.depth + 5
        var inputs: [[UInt8]] = []
        for k in 0..<count {
            // Every 5th incompressible; the last one short (an image end inside a cluster).
            var c = Self.cluster(k, size: cs, randomFraction: k % 5 == 4 ? 1 : 0.3)
            if k == count - 1 { c = Array(c[0..<1000]) }
            inputs.append(c)
        }
        var seen: [UInt64] = []
        var compressed = 0, stored = 0
        let sink: (UInt64, CompressPool.Result) throws -> Void = { guest, result in
            let k = Int(guest) / cs
            seen.append(guest)
            var expected = inputs[k]
            switch result {
            case .compressed(let stream):
                compressed += 1
                #expect(stream.count < cs)
                var out = [UInt8](repeating: 1, count: cs)
                let ok = out.withUnsafeMutableBytes { codec.decompress(stream, into: $0) }
                #expect(ok)
                // A short cluster was zero-padded for compression.
                expected += [UInt8](repeating: 0, count: cs - expected.count)
                #expect(out == expected)
            case .uncompressed(let bytes):
                stored += 1
                #expect(Array(bytes) == expected)
            }
        }
        for (k, c) in inputs.enumerated() {
            try c.withUnsafeBytes { try pool.submit(guestOffset: UInt64(k * cs), $0, sink: sink) }
        }
        try pool.drain(sink)
        #expect(seen == (0..<count).map { UInt64($0 * cs) })
        #expect(stored == count / 5)
        #expect(compressed == count - count / 5)
    }

    /// A pool dropped without `stop` (an owner that forgets, or unwinds past it) still ends its
    /// workers: they hold only the shared ring, so the pool's deinit runs and joins them.
    /// Before, each worker retained the pool: it was never freed and its threads ran for ever.
    @Test(arguments: [1, 3])
    func droppedPoolEndsItsWorkers(_ threads: Int) throws {
        weak var gone: CompressPool?
        let shared: CompressPool.Shared
        do {
            let pool = try CompressPool(clusterSize: 65536, threads: threads) { try QCOW2ClusterCompressor(codec: .zlib, clusterSize: 65536) }
            gone = pool
            shared = pool.shared
            #expect(shared.lock.withLock { shared.liveWorkers } == threads)
            // Some work in flight, so the workers are not just parked at their first wait.
            let data = Self.cluster(0, size: 65536, randomFraction: 0.3)
            for k in 0..<2 * threads {
                try data.withUnsafeBytes { try pool.submit(guestOffset: UInt64(k * 65536), $0) { _, _ in } }
            }
        }
        // deinit joined the workers before it returned: nothing to wait for.
        #expect(gone == nil, "the pool is still alive after its last owner dropped it")
        #expect(shared.lock.withLock { shared.liveWorkers } == 0, "worker threads outlived their pool")
    }

    /// `convert -c` through the target: compressible, incompressible and zero clusters, a
    /// size that is not a cluster multiple; the result passes qemu-img check and compare,
    /// zero clusters stay unallocated, and the file is much smaller than the data.
    @Test(arguments: ["zlib", "zstd"])
    func compressedTarget(_ compression: String) throws {
        let dir = try TempDir(prefix: "simg-cq")
        let path = dir.file("out.qcow2")
        let cs = 65536
        let size = 40 * cs + 12_800
        try ImageCreator.create(CreateRequest(format: .qcow2, path: path, size: UInt64(size),
                                              options: [CreateOption(name: "compression_type", value: compression)]),
                                announce: { _ in })
        var expected = [UInt8](repeating: 0, count: size)
        for k in 0..<41 {
            let start = k * cs, end = min(size, start + cs)
            switch k % 4 {
            case 0, 1: expected.replaceSubrange(start..<end, with: Self.cluster(k, size: cs, randomFraction: 0.05)[0..<(end - start)])
            case 2: break  // zeros
            default:
                if k == 39 {
                    expected.replaceSubrange(start..<end, with: Self.cluster(k, size: cs, randomFraction: 1)[0..<(end - start)])
                }
            }
        }
        let image = try QCOW2Image.open(path: path, writable: true)
        let target = try CompressedTarget(image: image, startsZeroed: true, threads: 2)
        // Chunks of 3 clusters, as a pipeline with a small buffer would send them.
        var offset = 0
        try expected.withUnsafeBytes { all in
            while offset < size {
                let n = min(3 * cs, size - offset)
                try target.write(UnsafeRawBufferPointer(rebasing: all[offset..<(offset + n)]), at: UInt64(offset))
                offset += n
            }
        }
        try target.finish()
        #expect(target.uncompressedClusters == 1)
        // k % 4 in {0, 1}: 21 compressible; k % 4 in {2, 3}: 19 zero and cluster 39 random.
        #expect(target.zeroClusters == 19)
        #expect(target.compressedClusters == 21)

        try qemuImgOutput(["check", path])
        let raw = dir.file("expected.raw")
        try Data(expected).write(to: URL(fileURLWithPath: raw))
        try qemuImgOutput(["compare", "-f", "qcow2", "-F", "raw", path, raw])
        // qemu-img 7.2's human map refuses images with compressed clusters: proof they are there.
        do {
            try qemuImgOutput(["map", path])
            Issue.record("qemu-img map found no compressed clusters")
        } catch let failure as QemuImgFailure {
            #expect(failure.description.contains("compressed clusters"))
        }
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_size % 512 == 0)
        // 4 metadata clusters, an L2 table, two clusters of streams (21 x ~3.4 KiB), one raw
        // cluster: far below the 22 data clusters written.
        #expect(Int(st.st_size) <= 8 * cs)
        let info = try qemuImgOutput(["info", "--output=json", path])
        #expect(info.contains("\"compression-type\": \"\(compression)\""))
    }

    @Test func refusesExternalDataFile() throws {
        let dir = try TempDir(prefix: "simg-cq")
        let path = dir.file("d.qcow2")
        try ImageCreator.create(CreateRequest(format: .qcow2, path: path, size: 1 << 20,
                                              options: [CreateOption(name: "data_file", value: dir.file("d.raw"))]),
                                announce: { _ in })
        let image = try QCOW2Image.open(path: path, writable: true)
        defer { try? image.close() }
        #expect(throws: ImageError.self) { _ = try CompressedTarget(image: image, startsZeroed: true) }
    }
}

/// A qcow2 image as `ImageTarget`, whose data the pipeline writes itself (asynchronously,
/// through the image's reserved direct writes), driven by the real pipeline.
@Suite struct QCOW2AsyncTargetTests {
    /// Writes `count` pseudo-random bytes at `offset` of a raw file (growing it).
    static func pattern(_ path: String, offset: UInt64, count: Int, seed: UInt64) throws {
        try writeBytes(TestSupport.pattern(seed: seed, count: count, nonZero: true), to: path, at: offset)
    }

    static func convert(_ source: String, to output: String, direct: Bool) throws -> ImageTarget {
        let src = try ImageOpener.open(source, options: OpenOptions(format: .raw))
        defer { try? src.close() }
        let image = try QCOW2Image.open(path: output, writable: true, cache: direct ? .none : .writeback)
        let target = ImageTarget(image: image, startsZeroed: true)
        var options = ConvertOptions()
        options.bufferSize = 1 << 20
        try ConvertPipeline(sources: [src], target: target, options: options).run()
        return target
    }

    /// A 48 MiB data run and a short tail (size not a cluster multiple): async writes, one
    /// host-contiguous extent, check and compare clean; buffered and O_DIRECT.
    @Test(arguments: [false, true])
    func freshTarget(_ direct: Bool) throws {
        let dir = try TempDir(prefix: "simg-cq")
        let source = dir.file("s.raw"), output = dir.file("o.qcow2")
        try Self.pattern(source, offset: 1 << 20, count: 48 << 20, seed: 5)
        try Self.pattern(source, offset: (60 << 20) + 4096, count: 70_000, seed: 6)
        let size: UInt64 = (60 << 20) + 4096 + 70_000 + 1000
        _ = truncate(source, off_t(size))
        try ImageCreator.create(CreateRequest(format: .qcow2, path: output, size: size), announce: { _ in })
        let target = try Self.convert(source, to: output, direct: direct)
        #expect(target.asyncWrites >= 48)
        // Only the short last chunk may need `write` (O_DIRECT cannot write it as is).
        #expect(target.fallbackWrites <= (direct ? 1 : 0))
        try qemuImgOutput(["check", output])
        try qemuImgOutput(["compare", "-f", "raw", "-F", "qcow2", source, output])
        let map = try qemuImgOutput(["map", "--output=json", output])
        let dataLines = map.split(separator: "\n").filter { $0.contains("\"data\": true") }
        #expect(dataLines.count == 2, "\(map)")
        #expect(dataLines.first?.contains("\"start\": 1048576, \"length\": 50331648") == true, "\(map)")
    }

    /// Into an image that already has data (-n): falls back to QCOW2Image.write.
    @Test func existingTarget() throws {
        let dir = try TempDir(prefix: "simg-cq")
        let source = dir.file("s.raw"), output = dir.file("o.qcow2")
        try Self.pattern(source, offset: 0, count: 3 << 20, seed: 7)
        _ = truncate(source, off_t(8 << 20))
        try ImageCreator.create(CreateRequest(format: .qcow2, path: output, size: 8 << 20), announce: { _ in })
        try qemuImgOutput(["convert", "-n", "-f", "raw", "-O", "qcow2", source, output])  // same data, allocated
        try Self.pattern(source, offset: 1 << 20, count: 1 << 20, seed: 8)
        let image = try QCOW2Image.open(path: output, writable: true)
        let target = ImageTarget(image: image, startsZeroed: false)
        try ConvertPipeline(sources: [try ImageOpener.open(source, options: OpenOptions(format: .raw))],
                            target: target, options: ConvertOptions()).run()
        #expect(target.fallbackWrites > 0)
        try qemuImgOutput(["check", output])
        try qemuImgOutput(["compare", "-f", "raw", "-F", "qcow2", source, output])
    }
}
