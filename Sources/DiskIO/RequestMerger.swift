/// Merges many small byte ranges (guest or host offsets) into fewer large ones, so that a
/// copy issues a few big reads and writes instead of many small ones.
///
/// Usage per batch: `reset()`, `add(...)` each range (up to `capacity`), then `merge()`; the
/// result lists merged ranges, each naming a run of the sorted `ranges`. Storage is allocated
/// once at init and reused by every batch.
///
/// Ranges are sorted by offset, stable (ranges at the same offset keep the order they were
/// added in). Adjacent and overlapping ranges are merged, and so are ranges separated by a
/// gap of at most `gapLimit` bytes, as long as the merged range stays within `maxLength`.
/// A range already longer than `maxLength` is never split; it simply stays on its own
/// (except that ranges lying entirely inside it join it, since they do not make it longer).
public struct RequestMerger {
    /// One range to merge; `payload` is the caller's index for it (a buffer, a request).
    public struct Range: Equatable, Sendable {
        public var offset: UInt64
        public var length: UInt64
        public var payload: Int

        public init(offset: UInt64, length: UInt64, payload: Int) {
            self.offset = offset
            self.length = length
            self.payload = payload
        }

        /// The end offset, saturating instead of overflowing for nonsense input.
        public var end: UInt64 {
            let (sum, overflow) = offset.addingReportingOverflow(length)
            return overflow ? UInt64.max : sum
        }
    }

    /// A merged range covering `ranges[firstRange ..< firstRange + rangeCount]`.
    public struct Merged: Equatable, Sendable {
        public var offset: UInt64
        public var length: UInt64
        public var firstRange: Int
        public var rangeCount: Int
        /// Bytes inside the merged range that no member covers (the filled gaps).
        public var gapBytes: UInt64

        public init(offset: UInt64, length: UInt64, firstRange: Int, rangeCount: Int, gapBytes: UInt64) {
            self.offset = offset
            self.length = length
            self.firstRange = firstRange
            self.rangeCount = rangeCount
            self.gapBytes = gapBytes
        }

        public var end: UInt64 { offset + length }
        public var memberIndices: Swift.Range<Int> { firstRange ..< firstRange + rangeCount }
    }

    public let capacity: Int
    public var maxLength: UInt64
    public var gapLimit: UInt64
    /// The ranges added so far; sorted by offset after `merge()`.
    public private(set) var ranges: [Range]
    /// The result of the last `merge()`.
    public private(set) var merged: [Merged]
    private var scratch: [Range]

    public init(capacity: Int, maxLength: UInt64, gapLimit: UInt64 = 0) {
        precondition(capacity > 0, "a request merger needs room for at least one range")
        self.capacity = capacity
        self.maxLength = maxLength
        self.gapLimit = gapLimit
        ranges = []
        ranges.reserveCapacity(capacity)
        merged = []
        merged.reserveCapacity(capacity)
        scratch = [Range](repeating: Range(offset: 0, length: 0, payload: 0), count: capacity)
    }

    public var count: Int { ranges.count }
    public var isFull: Bool { ranges.count >= capacity }

    /// Forgets the previous batch, keeping the storage.
    public mutating func reset() {
        ranges.removeAll(keepingCapacity: true)
        merged.removeAll(keepingCapacity: true)
    }

    /// Adds a range; false (and nothing added) when the batch is full.
    @discardableResult
    public mutating func add(offset: UInt64, length: UInt64, payload: Int) -> Bool {
        guard ranges.count < capacity else { return false }
        ranges.append(Range(offset: offset, length: length, payload: payload))
        return true
    }

    /// Sorts the batch and computes the merged ranges.
    @discardableResult
    public mutating func merge() -> [Merged] {
        sortRanges()
        merged.removeAll(keepingCapacity: true)
        var i = 0
        while i < ranges.count {
            let start = ranges[i].offset
            var end = ranges[i].end
            var gaps: UInt64 = 0
            let first = i
            i += 1
            while i < ranges.count {
                let next = ranges[i]
                let gap = next.offset > end ? next.offset - end : 0
                if gap > gapLimit { break }
                let newEnd = max(end, next.end)
                // Joining must not make the range longer than the cap; a member that ends
                // inside the current range never makes it longer.
                if newEnd > end && newEnd - start > maxLength { break }
                gaps += gap
                end = newEnd
                i += 1
            }
            merged.append(Merged(offset: start, length: end - start, firstRange: first,
                                 rangeCount: i - first, gapBytes: gaps))
        }
        return merged
    }

    /// Stable merge sort by offset into the preallocated scratch array (Swift's own sort may
    /// allocate a temporary buffer on every call). Already sorted input costs one pass.
    private mutating func sortRanges() {
        let n = ranges.count
        var sorted = true
        for i in stride(from: 1, to: n, by: 1) where ranges[i - 1].offset > ranges[i].offset {
            sorted = false
            break
        }
        if sorted { return }
        var width = 1
        var inScratch = false
        while width < n {
            if inScratch {
                RequestMerger.mergePass(from: scratch, into: &ranges, width: width, count: n)
            } else {
                RequestMerger.mergePass(from: ranges, into: &scratch, width: width, count: n)
            }
            inScratch.toggle()
            width *= 2
        }
        if inScratch {
            for i in 0..<n { ranges[i] = scratch[i] }
        }
    }

    private static func mergePass(from source: [Range], into target: inout [Range], width: Int, count n: Int) {
        var start = 0
        while start < n {
            let mid = min(start + width, n)
            let stop = min(start + 2 * width, n)
            var left = start, right = mid, out = start
            while left < mid && right < stop {
                // `<=` takes the left (earlier) one on ties: that keeps the sort stable.
                if source[left].offset <= source[right].offset {
                    target[out] = source[left]
                    left += 1
                } else {
                    target[out] = source[right]
                    right += 1
                }
                out += 1
            }
            while left < mid { target[out] = source[left]; left += 1; out += 1 }
            while right < stop { target[out] = source[right]; right += 1; out += 1 }
            start = stop
        }
    }
}
