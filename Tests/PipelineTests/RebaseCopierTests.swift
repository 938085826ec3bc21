import DiskIO
import ImageFormats
import Testing
@testable import Pipeline

/// An in-memory image with 64 KiB clusters (the copier's cluster size for non-qcow2 images):
/// each cluster is data, zero, or unallocated (read from `backing`, zeros past its end).
private final class RebaseMemoryImage: DiskImage {
    static let cluster = 65536
    let path: String
    var format: ImageFormat { .qcow2 }
    let virtualSize: UInt64
    var isWritable: Bool { true }
    var backing: (any DiskImage)?
    var dataFile: DiskFile { fatalError("not used by the copier") }
    var file: DiskFile { dataFile }
    var bytes: [UInt8]
    var kinds: [Character]  // "d" data, "z" zero, "-" unallocated
    var reads: UInt64 = 0
    var writes: [(UInt64, UInt64)] = []
    var zeroWrites: [(UInt64, UInt64)] = []

    init(_ path: String, clusters: Int, backing: (any DiskImage)? = nil) {
        self.path = path
        virtualSize = UInt64(clusters * Self.cluster)
        bytes = [UInt8](repeating: 0, count: clusters * Self.cluster)
        kinds = [Character](repeating: "-", count: clusters)
        self.backing = backing
    }

    func fill(cluster: Int, with value: UInt8) {
        for i in (cluster * Self.cluster)..<((cluster + 1) * Self.cluster) { bytes[i] = value }
        kinds[cluster] = "d"
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        reads += UInt64(buffer.count)
        for i in 0..<buffer.count {
            let at = Int(offset) + i
            switch kinds[at / Self.cluster] {
            case "d": buffer[i] = bytes[at]
            case "z": buffer[i] = 0
            default:
                if let backing, UInt64(at) < backing.virtualSize {
                    var byte: UInt8 = 0
                    try withUnsafeMutableBytes(of: &byte) { try backing.read(into: $0, at: UInt64(at)) }
                    buffer[i] = byte
                } else {
                    buffer[i] = 0
                }
            }
        }
    }

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        writes.append((offset, UInt64(data.count)))
        for i in 0..<data.count { bytes[Int(offset) + i] = data[i] }
        for c in (Int(offset) / Self.cluster)..<((Int(offset) + data.count) / Self.cluster) { kinds[c] = "d" }
    }

    func writeZeroes(at offset: UInt64, length: UInt64) throws {
        zeroWrites.append((offset, length))
        for c in (Int(offset) / Self.cluster)..<(Int(offset + length) / Self.cluster) { kinds[c] = "z" }
    }

    func discard(at offset: UInt64, length: UInt64) throws {}

    func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
        let first = Int(offset) / Self.cluster
        let kind = kinds[first]
        var end = first + 1
        while UInt64(end * Self.cluster) < offset + length, kinds[end] == kind { end += 1 }
        let length = min(offset + length, UInt64(end * Self.cluster)) - offset
        switch kind {
        case "d": return Extent(offset: offset, length: length, kind: .data(hostOffset: nil))
        case "z": return Extent(offset: offset, length: length, kind: .zero)
        default:
            guard let backing else { return Extent(offset: offset, length: length, kind: .hole) }
            if offset >= backing.virtualSize { return Extent(offset: offset, length: length, kind: .hole) }
            return Extent(offset: offset, length: min(length, backing.virtualSize - offset), kind: .backing)
        }
    }

    func flush() throws {}
    func close() throws {}
    func info() throws -> ImageInfo { ImageInfo(filename: path, format: "qcow2", virtualSize: virtualSize) }

    /// Every guest byte, as read through the chain.
    func content() throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(virtualSize))
        try out.withUnsafeMutableBytes { try read(into: $0, at: 0) }
        reads = 0
        return out
    }
}

@Suite("Rebase copier")
struct RebaseCopierTests {
    static let c = UInt64(RebaseMemoryImage.cluster)

    @Test func writesOnlyDifferingClustersAndZeroesWhereOldReadsZero() throws {
        let old = RebaseMemoryImage("old", clusters: 8)
        old.fill(cluster: 0, with: 1)
        old.fill(cluster: 1, with: 2)
        old.fill(cluster: 5, with: 3)
        let new = RebaseMemoryImage("new", clusters: 4)  // shorter: cluster 5 reads zero through it
        new.fill(cluster: 0, with: 1)  // same
        new.fill(cluster: 1, with: 9)  // differs
        new.fill(cluster: 2, with: 4)  // old reads zeros here
        let top = RebaseMemoryImage("top", clusters: 8, backing: old)
        top.fill(cluster: 1, with: 7)  // own data: not compared, not written
        let before = try top.content()

        let stats = try RebaseCopier.copyDifferences(overlay: top, newBacking: new, bufferSize: 3 * Int(Self.c))

        #expect(top.writes.map(\.0) == [5 * Self.c])
        #expect(top.zeroWrites.map(\.0) == [2 * Self.c])
        #expect(stats.bytesWritten == Self.c)
        #expect(stats.bytesZeroed == Self.c)
        top.backing = new
        #expect(try top.content() == before)
    }

    @Test func skipsRangesBothSidesKnowAreZero() throws {
        let old = RebaseMemoryImage("old", clusters: 16)
        old.fill(cluster: 3, with: 5)
        let new = RebaseMemoryImage("new", clusters: 16)
        let top = RebaseMemoryImage("top", clusters: 16, backing: old)
        let stats = try RebaseCopier.copyDifferences(overlay: top, newBacking: new)
        // Only cluster 3 (data in old) is read; the new side there is known zero.
        #expect(stats.bytesCompared == Self.c)
        #expect(new.reads == 0)
        #expect(top.writes.map(\.0) == [3 * Self.c])
    }

    @Test func standaloneCopiesEverythingTheChainReads() throws {
        let old = RebaseMemoryImage("old", clusters: 4)
        old.fill(cluster: 0, with: 1)
        old.fill(cluster: 2, with: 2)
        let top = RebaseMemoryImage("top", clusters: 4, backing: old)
        let before = try top.content()
        _ = try RebaseCopier.copyDifferences(overlay: top, newBacking: nil)
        top.backing = nil
        #expect(try top.content() == before)
        #expect(top.writes.map(\.0) == [0, 2 * Self.c])
    }

    @Test func sharedLayerLimitsTheComparisonToLayersAboveIt() throws {
        let base = RebaseMemoryImage("base", clusters: 8)
        for c in 0..<8 { base.fill(cluster: c, with: UInt8(c + 1)) }
        let mid = RebaseMemoryImage("mid", clusters: 8, backing: base)
        mid.fill(cluster: 2, with: 9)  // differs from base
        mid.fill(cluster: 4, with: 5)  // same bytes as base
        let top = RebaseMemoryImage("top", clusters: 8, backing: mid)
        let before = try top.content()
        base.reads = 0

        let stats = try RebaseCopier.copyDifferences(overlay: top, newBacking: base, sharedLayer: base)

        // Clusters 2 and 4 are compared (both sides), nothing else is read.
        #expect(stats.bytesCompared == 4 * Self.c)
        #expect(top.writes.map(\.0) == [2 * Self.c])
        top.backing = base
        #expect(try top.content() == before)
    }
}
