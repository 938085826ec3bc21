import Testing
@testable import ImageFormats

/// The in-memory dirty bitmap: rounding, ranges, merges across granularities, resizes, and
/// QEMU's serialized byte order.
struct DirtyBitmapTests {
    @Test func markDirtyRoundsOutward() {
        var b = DirtyBitmap(granularity: 4096, size: 4 << 20)
        b.markDirty(offset: 4095, length: 2)
        #expect(b.dirtyRanges().map { [$0.offset, $0.length] } == [[0, 8192]])
        b.markDirty(offset: 4_096_000, length: 512)
        #expect(b.dirtyRanges().map { [$0.offset, $0.length] } == [[0, 8192], [4_096_000, 4096]])
        #expect(b.dirtyChunks == 3)
    }

    @Test func rangesAtTheEndAndPartialChunk() {
        var b = DirtyBitmap(granularity: 65536, size: 100_000)
        #expect(b.chunkCount == 2)
        b.markDirty(offset: 99_999, length: 10)
        #expect(b.dirtyRanges().map { [$0.offset, $0.length] } == [[65536, 100_000 - 65536]])
    }

    @Test func mergeAcrossGranularities() {
        var fine = DirtyBitmap(granularity: 512, size: 4 << 20)
        fine.markDirty(offset: 0, length: 1024)
        fine.markDirty(offset: 3 << 20, length: 5120)
        fine.markDirty(offset: 4_096_000, length: 512)
        var coarse = DirtyBitmap(granularity: 1024, size: 4 << 20)
        coarse.merge(fine)
        #expect(coarse.dirtyRanges().map { [$0.offset, $0.length] } == [[0, 1024], [3 << 20, 5120], [4_096_000, 1024]])
        var same = DirtyBitmap(granularity: 512, size: 4 << 20)
        same.merge(fine)
        #expect(same == fine)
    }

    @Test func serializationIsLeastSignificantBitFirst() {
        var b = DirtyBitmap(granularity: 512, size: 1 << 20)
        b.set(chunks: 0, count: 1)
        b.set(chunks: 9, count: 1)
        b.set(chunks: 1000, count: 1)
        let bytes = b.serializedBytes(from: 0, count: 256)
        #expect(bytes[0] == 1 && bytes[1] == 2 && bytes[125] == 1)
        var c = DirtyBitmap(granularity: 512, size: 1 << 20)
        c.deserialize(Array(bytes[100...]), at: 100)
        c.deserialize(Array(bytes[..<100]), at: 0)
        #expect(c == b)
    }

    @Test func resizeKeepsBitsAndDropsThePast() {
        var b = DirtyBitmap(granularity: 65536, size: 1 << 20)
        b.markDirty(offset: 0, length: 1)
        b.markDirty(offset: (1 << 20) - 1, length: 1)
        b.resize(to: 2 << 20)
        #expect(b.dirtyChunks == 2 && !b.isDirty(offset: 1 << 20, length: 1 << 20))
        b.resize(to: 65536)
        #expect(b.dirtyChunks == 1 && b.chunkCount == 1)
    }
}
