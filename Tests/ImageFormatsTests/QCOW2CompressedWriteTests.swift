import DiskIO
import Foundation
import Testing
@testable import ImageFormats
import TestSupport

/// Compressed cluster writes: descriptors, packing several streams per host cluster, streams
/// spanning host clusters, refcounts (checked by `qemu-img check`), and read-back through both
/// simg and qemu (`qemu-img compare` against the expected raw bytes).
@Suite struct QCOW2CompressedWriteTests {
    /// Cluster `index` of a test pattern: `ratio` of it is pseudo-random (incompressible),
    /// the rest repeated text. ratio 1 gives incompressible clusters.
    static func pattern(_ index: Int, size: Int, ratio: Double) -> [UInt8] {
        compressibleBytes(size: size, seed: UInt64(index + 1), randomFraction: ratio,
                          text: "cluster \(index) says hello to the compressor; ")
    }

    static func create(_ path: String, size: UInt64, options: [(String, String)]) throws {
        let request = CreateRequest(format: .qcow2, path: path, size: size,
                                    options: options.map { CreateOption(name: $0.0, value: $0.1) })
        try ImageCreator.create(request, announce: { _ in })
    }

    /// Writes `clusters` (nil = leave unallocated) compressed where they compress, else
    /// uncompressed, like `convert -c`; returns the expected guest contents.
    static func fill(_ image: QCOW2Image, _ clusters: [[UInt8]?]) throws -> [UInt8] {
        let cs = image.clusterSize
        let compressor = try QCOW2ClusterCompressor(codec: image.compressionCodec, clusterSize: cs)
        var expected = [UInt8](repeating: 0, count: Int(image.virtualSize))
        // Streams point into the compressor's buffer: keep it alive until they are written.
        defer { withExtendedLifetime(compressor) {} }
        for (k, cluster) in clusters.enumerated() {
            guard let cluster else { continue }
            let guest = UInt64(k * cs)
            expected.replaceSubrange(k * cs..<(k + 1) * cs, with: cluster)
            try cluster.withUnsafeBytes { input in
                if let stream = compressor.compress(input) {
                    try image.writeCompressedCluster(guestOffset: guest, compressed: stream)
                } else {
                    try image.write(input, at: guest)
                }
            }
        }
        return expected
    }

    static func check(_ path: String, expected: [UInt8], scratch: TempDir) throws {
        try qemuImgOutput(["check", "-f", "qcow2", path])
        let raw = scratch.file("expected.raw")
        try Data(expected).write(to: URL(fileURLWithPath: raw))
        try qemuImgOutput(["compare", "-f", "qcow2", "-F", "raw", path, raw])
        // And through simg's own read path.
        let image = try QCOW2Image.open(path: path)
        defer { try? image.close() }
        var back = [UInt8](repeating: 1, count: expected.count)
        try back.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        #expect(back == expected)
    }

    @Test(arguments: [
        [("compression_type", "zlib")],
        [("compression_type", "zstd")],
        [("extended_l2", "on")],
        [("refcount_bits", "1")],
        [("refcount_bits", "64"), ("compression_type", "zstd")],
        [("compat", "0.10")],
        [("cluster_size", "4096")],
        [("cluster_size", "512")],
        [("cluster_size", "2M")],
    ])
    func roundTrip(_ options: [(String, String)]) throws {
        try Self.roundTrip(options, direct: false)
    }

    /// O_DIRECT: runs of streams are widened to whole blocks (no read-modify-write).
    /// Clusters smaller than the O_DIRECT unit (where the file system asks for 4096) are not
    /// widened: neighbouring clusters must survive.
    @Test(arguments: [[("cluster_size", "65536")], [("cluster_size", "4096"), ("compression_type", "zstd")],
                      [("cluster_size", "512")], [("cluster_size", "1024"), ("refcount_bits", "1")]])
    func roundTripDirect(_ options: [(String, String)]) throws {
        try Self.roundTrip(options, direct: true)
    }

    static func roundTrip(_ options: [(String, String)], direct: Bool) throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("c.qcow2")
        let clusterSize = Int(options.first { $0.0 == "cluster_size" }.map { try! SizeParser.parse($0.1) } ?? 65536)
        let count = clusterSize >= 1 << 21 ? 5 : 24
        try Self.create(path, size: UInt64(count * clusterSize), options: options)
        let image = try QCOW2Image.open(path: path, writable: true, cache: direct ? .none : .writeback)
        // Mixed: well compressible, half random (streams cross host clusters), incompressible,
        // and holes.
        var clusters: [[UInt8]?] = []
        for k in 0..<count {
            switch k % 6 {
            case 0, 1: clusters.append(Self.pattern(k, size: clusterSize, ratio: 0.05))
            case 2, 3: clusters.append(Self.pattern(k, size: clusterSize, ratio: 0.55))
            case 4: clusters.append(Self.pattern(k, size: clusterSize, ratio: 1))
            default: clusters.append(nil)
            }
        }
        let expected = try Self.fill(image, clusters)
        let status = try image.blockStatus(at: 0, length: UInt64(clusterSize))
        let d = try image.l2Mapping(guest: 0).entry
            .compressedDescriptor(clusterBits: UInt32(clusterSize.trailingZeroBitCount))
        #expect(status.kind == .compressed(hostOffset: d.hostOffset, length: Int(d.byteLength)))
        try image.alignFileEndToSector()
        try image.close()
        #expect(try fileSizes(path).size % 512 == 0)
        try Self.check(path, expected: expected, scratch: scratch)
    }

    /// Small streams share host clusters; each host cluster's refcount counts its streams.
    @Test func packsStreams() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("p.qcow2")
        try Self.create(path, size: 64 * 65536, options: [])
        let image = try QCOW2Image.open(path: path, writable: true)
        let clusters: [[UInt8]?] = (0..<64).map { Self.pattern($0, size: 65536, ratio: 0.002) }
        let expected = try Self.fill(image, clusters)
        let state = try image.writer()
        let compressor = try QCOW2ClusterCompressor(codec: .zlib, clusterSize: 65536)
        var hostClusters: [UInt64: UInt64] = [:]
        var lastEnd: UInt64 = 0
        for k in 0..<64 {
            let entry = try image.l2Mapping(guest: UInt64(k) * 65536).entry
            #expect(entry.isCompressed && !entry.isCopied)
            let d = entry.compressedDescriptor(clusterBits: 16)
            if k > 0 { #expect(d.hostOffset == lastEnd) }  // packed back to back
            let first = d.hostOffset >> 16
            let last = (d.hostOffset + d.byteLength - 1) >> 16
            for c in first...last { hostClusters[c, default: 0] += 1 }
            let length = try #require(clusters[k]!.withUnsafeBytes { compressor.compress($0)?.count })
            lastEnd = d.hostOffset + UInt64(length)
            // The cluster's extent is its descriptor.
            #expect(try image.blockStatus(at: UInt64(k) * 65536, length: 65536).kind
                    == .compressed(hostOffset: d.hostOffset, length: Int(d.byteLength)))
        }
        // Packed back to back, the 64 clusters are one extent holding all their bytes.
        let firstHost = try image.l2Mapping(guest: 0).entry.compressedDescriptor(clusterBits: 16).hostOffset
        let lastD = try image.l2Mapping(guest: 63 * 65536).entry.compressedDescriptor(clusterBits: 16)
        #expect(try image.blockStatus(at: 0, length: 64 * 65536) == Extent(offset: 0, length: 64 * 65536,
                kind: .compressed(hostOffset: firstHost, length: Int(lastD.hostOffset + lastD.byteLength - firstHost))))
        #expect(hostClusters.count == 1)
        for (cluster, streams) in hostClusters {
            #expect(try state.refcounts.refcount(ofCluster: cluster) == streams)
        }
        try image.close()
        try Self.check(path, expected: expected, scratch: scratch)
    }

    @Test func refusesAllocatedCluster() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("a.qcow2")
        try Self.create(path, size: 4 * 65536, options: [])
        let image = try QCOW2Image.open(path: path, writable: true)
        defer { try? image.close() }
        let data = Self.pattern(1, size: 65536, ratio: 0)
        try data.withUnsafeBytes { try image.write($0, at: 0) }
        let compressor = try QCOW2ClusterCompressor(codec: .zlib, clusterSize: 65536)
        // The stream points into the compressor's buffer: copy it while the compressor lives.
        let stream: [UInt8] = try #require(withExtendedLifetime(compressor) {
            data.withUnsafeBytes { compressor.compress($0).map(Array.init) }
        })
        #expect(throws: ImageError.self) {
            try stream.withUnsafeBytes { try image.writeCompressedCluster(guestOffset: 0, compressed: $0) }
        }
        // Not cluster-aligned, and a stream as long as a cluster: refused too.
        #expect(throws: ImageError.self) {
            try stream.withUnsafeBytes { try image.writeCompressedCluster(guestOffset: 512, compressed: $0) }
        }
        #expect(throws: ImageError.self) {
            try data.withUnsafeBytes { try image.writeCompressedCluster(guestOffset: 65536, compressed: $0) }
        }
        // A zero cluster without a host cluster may be replaced.
        try image.writeZeroes(at: 2 * 65536, length: 65536)
        try stream.withUnsafeBytes { try image.writeCompressedCluster(guestOffset: 2 * 65536, compressed: $0) }
        var back = [UInt8](repeating: 0, count: 65536)
        try back.withUnsafeMutableBytes { try image.read(into: $0, at: 2 * 65536) }
        #expect(back == data)
    }

    @Test func refusesExternalDataFile() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("d.qcow2")
        try Self.create(path, size: 4 * 65536, options: [("data_file", scratch.file("d.raw"))])
        let image = try QCOW2Image.open(path: path, writable: true)
        defer { try? image.close() }
        let stream = [UInt8](repeating: 7, count: 100)
        #expect(throws: ImageError.self) {
            try stream.withUnsafeBytes { try image.writeCompressedCluster(guestOffset: 0, compressed: $0) }
        }
    }

    /// reserveForDirectWrite + mapDirectWrite: one contiguous host run across L2 tables (tables
    /// placed first), data written there by the caller and then mapped reads back and passes
    /// qemu-img check; anything but fresh, aligned ranges is declined (nil).
    @Test(arguments: [false, true])
    func directWriteAllocation(_ extendedL2: Bool) throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("w.qcow2")
        let cs = extendedL2 ? 16384 : 4096
        // 4K clusters: one L2 table maps 2 MiB (extended 16K: 16 MiB); the run crosses two tables.
        let span = extendedL2 ? 16 << 20 : 2 << 20
        let requested = UInt64(2 * span + 3 * cs + 100)
        var options = [("cluster_size", String(cs))]
        if extendedL2 { options.append(("extended_l2", "on")) }
        try Self.create(path, size: requested, options: options)
        let image = try QCOW2Image.open(path: path, writable: true)
        let size = image.virtualSize  // rounded up to 512 bytes at creation
        #expect(size % UInt64(cs) != 0)
        var expected = [UInt8](repeating: 0, count: Int(size))
        let start = span - 4 * cs, length = 12 * cs
        let data = Self.pattern(3, size: length, ratio: 1)
        expected.replaceSubrange(start..<(start + length), with: data)
        let host = try Self.writeDirectly(data, at: start, into: image)
        // Allocated now: declined; so are unaligned ranges and a short range not at the end.
        #expect(try image.reserveForDirectWrite(at: UInt64(start), length: UInt64(cs)) == nil)
        #expect(try image.reserveForDirectWrite(at: UInt64(cs / 2), length: UInt64(cs)) == nil)
        #expect(try image.reserveForDirectWrite(at: 0, length: UInt64(cs / 2)) == nil)
        // The tail cluster at the end of the image may be short.
        let tailStart = Int(size) / cs * cs
        let tail = Self.pattern(4, size: Int(size) - tailStart, ratio: 1)
        expected.replaceSubrange(tailStart..<Int(size), with: tail)
        _ = try Self.writeDirectly(tail, at: tailStart, into: image)
        // One host-contiguous extent for the whole run.
        let extent = try image.blockStatus(at: UInt64(start), length: UInt64(length))
        #expect(extent.length == UInt64(length))
        #expect(extent.kind == .data(hostOffset: host))
        try image.close()
        try Self.check(path, expected: expected, scratch: scratch)
    }

    /// What convert's qcow2 target does with a fresh run: reserve it, write the data there
    /// itself, map it once the write is done. Returns the run's host offset.
    static func writeDirectly(_ data: [UInt8], at guest: Int, into image: QCOW2Image) throws -> UInt64 {
        let run = try #require(try image.reserveForDirectWrite(at: UInt64(guest), length: UInt64(data.count)))
        try data.withUnsafeBytes { try image.dataFile.write($0, at: run.hostOffset) }
        try image.mapDirectWrite(run)
        return run.hostOffset
    }

    @Test func directWriteAllocationDeclinesExternalData() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("x.qcow2")
        try Self.create(path, size: 1 << 20, options: [("data_file", scratch.file("x.raw"))])
        let image = try QCOW2Image.open(path: path, writable: true)
        defer { try? image.close() }
        #expect(try image.reserveForDirectWrite(at: 0, length: 65536) == nil)
    }

    /// The compressor's streams decode with the image codec's decompressor, and data that
    /// does not shrink below a cluster is reported as such.
    @Test(arguments: [QCOW2Compression.zlib, .zstd])
    func compressorStreams(_ codec: QCOW2Compression) throws {
        let compressor = try QCOW2ClusterCompressor(codec: codec, clusterSize: 65536)
        for k in 0..<4 {
            let input = Self.pattern(k, size: 65536, ratio: 0.3)
            let stream = try #require(input.withUnsafeBytes { compressor.compress($0).map(Array.init) })
            #expect(stream.count < 65536 * 4 / 10)
            var out = [UInt8](repeating: 0, count: 65536)
            let ok = stream.withUnsafeBytes { s in out.withUnsafeMutableBytes { codec.decompress(s, into: $0) } }
            #expect(ok)
            #expect(out == input)
        }
        let random = Self.pattern(9, size: 65536, ratio: 1)
        #expect(random.withUnsafeBytes { compressor.compress($0) } == nil)
    }
}
