import DiskIO
import Testing

@Suite("RequestMerger")
struct RequestMergerTests {
    typealias Merged = RequestMerger.Merged

    @Test func mergesAdjacentRangesInAnyOrder() {
        var merger = RequestMerger(capacity: 16, maxLength: 1 << 20)
        merger.add(offset: 8192, length: 4096, payload: 2)
        merger.add(offset: 0, length: 4096, payload: 0)
        merger.add(offset: 4096, length: 4096, payload: 1)
        merger.add(offset: 20000, length: 100, payload: 3)
        let merged = merger.merge()
        #expect(merged == [Merged(offset: 0, length: 12288, firstRange: 0, rangeCount: 3, gapBytes: 0),
                           Merged(offset: 20000, length: 100, firstRange: 3, rangeCount: 1, gapBytes: 0)])
        #expect(merger.ranges.map(\.payload) == [0, 1, 2, 3])
    }

    @Test func mergesOverlapsKeepingAddOrderOnTies() {
        var merger = RequestMerger(capacity: 16, maxLength: 1 << 20)
        merger.add(offset: 100, length: 50, payload: 0)
        merger.add(offset: 0, length: 120, payload: 1)
        merger.add(offset: 100, length: 10, payload: 2)
        let merged = merger.merge()
        #expect(merged == [Merged(offset: 0, length: 150, firstRange: 0, rangeCount: 3, gapBytes: 0)])
        #expect(merger.ranges.map(\.payload) == [1, 0, 2])
    }

    @Test func fillsSmallGapsOnly() {
        var merger = RequestMerger(capacity: 16, maxLength: 1 << 20, gapLimit: 4096)
        merger.add(offset: 0, length: 4096, payload: 0)
        merger.add(offset: 8192, length: 4096, payload: 1)      // gap 4096: filled
        merger.add(offset: 12288 + 4097, length: 10, payload: 2)  // gap 4097: not filled
        let merged = merger.merge()
        #expect(merged == [Merged(offset: 0, length: 12288, firstRange: 0, rangeCount: 2, gapBytes: 4096),
                           Merged(offset: 16385, length: 10, firstRange: 2, rangeCount: 1, gapBytes: 0)])
        var noGaps = RequestMerger(capacity: 4, maxLength: 1 << 20)
        noGaps.add(offset: 0, length: 10, payload: 0)
        noGaps.add(offset: 11, length: 10, payload: 1)
        #expect(noGaps.merge().count == 2)
    }

    @Test func capsMergedLength() {
        var merger = RequestMerger(capacity: 16, maxLength: 10000)
        for i in 0..<10 { merger.add(offset: UInt64(i) * 4096, length: 4096, payload: i) }
        let merged = merger.merge()
        #expect(merged.map(\.length) == [8192, 8192, 8192, 8192, 8192])
        #expect(merged.allSatisfy { $0.length <= 10000 })
        #expect(merged.map(\.rangeCount).reduce(0, +) == 10)
    }

    @Test func neverSplitsALargeRange() {
        var merger = RequestMerger(capacity: 16, maxLength: 4096)
        merger.add(offset: 0, length: 1 << 20, payload: 0)
        merger.add(offset: 1 << 20, length: 512, payload: 1)
        merger.add(offset: 4096, length: 512, payload: 2)  // inside the big one: joins it
        let merged = merger.merge()
        #expect(merged == [Merged(offset: 0, length: 1 << 20, firstRange: 0, rangeCount: 2, gapBytes: 0),
                           Merged(offset: 1 << 20, length: 512, firstRange: 2, rangeCount: 1, gapBytes: 0)])
    }

    @Test func capacityAndReuse() {
        var merger = RequestMerger(capacity: 2, maxLength: 1 << 20)
        let added = [merger.add(offset: 0, length: 1, payload: 0),
                     merger.add(offset: 1, length: 1, payload: 1),
                     merger.add(offset: 2, length: 1, payload: 2)]
        #expect(added == [true, true, false])
        #expect(merger.count == 2)
        #expect(merger.isFull)
        #expect(merger.merge().count == 1)
        merger.reset()
        #expect(merger.count == 0 && merger.merged.isEmpty)
        merger.add(offset: 50, length: 1, payload: 7)
        #expect(merger.merge() == [Merged(offset: 50, length: 1, firstRange: 0, rangeCount: 1, gapBytes: 0)])
    }

    @Test func sortsLargeShuffledBatchStably() {
        var rng = SeededGenerator(state: 42)
        var merger = RequestMerger(capacity: 1000, maxLength: 1 << 40)
        let offsets = (0..<1000).map { UInt64($0 / 2) * 100 }.shuffled(using: &rng)
        for (i, offset) in offsets.enumerated() { merger.add(offset: offset, length: 100, payload: i) }
        let merged = merger.merge()
        #expect(merged.count == 1)
        #expect(merged[0].length == 500 * 100)
        let ranges = merger.ranges
        for (a, b) in zip(ranges, ranges.dropFirst()) {
            #expect(a.offset < b.offset || (a.offset == b.offset && a.payload < b.payload))
        }
    }
}
