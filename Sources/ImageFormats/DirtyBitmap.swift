/// A dirty bitmap in memory, as QEMU's HBitmap keeps one: one bit per `granularity` bytes of a
/// guest of `size` bytes (the last chunk may be partial). Format-neutral: qcow2 loads and stores
/// it (QCOW2Bitmaps.swift), `bitmap --merge` moves it between images, and the write path is to
/// mark guest writes in it (`markDirty`) and resize it with the image (`resize`).
///
/// The serialized form is QEMU's (hbitmap_serialize_part): bit i of the bitmap is bit i % 8 of
/// byte i / 8, least significant bit first; the in-memory words are little-endian-ordered the
/// same way, so a byte run is a plain copy of the words' bytes.
public struct DirtyBitmap: Sendable, Equatable {
    /// Bytes per bit, a power of two (QEMU's limits for qcow2: 512 bytes to 2 GiB).
    public let granularity: UInt64
    /// The guest size covered.
    public private(set) var size: UInt64
    /// Bit i = chunk i; bits past `chunkCount` are always 0.
    private var words: [UInt64]

    public init(granularity: UInt64, size: UInt64) {
        precondition(granularity > 0 && granularity & (granularity - 1) == 0, "granularity must be a power of two")
        self.granularity = granularity
        self.size = size
        words = [UInt64](repeating: 0, count: Int((Self.chunks(size, granularity) + 63) / 64))
    }

    static func chunks(_ size: UInt64, _ granularity: UInt64) -> UInt64 {
        size / granularity + (size % granularity == 0 ? 0 : 1)
    }

    /// Bits in the bitmap (chunks of the guest, the last maybe partial).
    public var chunkCount: UInt64 { Self.chunks(size, granularity) }

    public func isDirty(chunk: UInt64) -> Bool {
        chunk < chunkCount && words[Int(chunk >> 6)] & (1 << (chunk & 63)) != 0
    }

    /// Whether any byte of [offset, offset + length) is in a dirty chunk.
    public func isDirty(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0, offset < size else { return false }
        let last = (min(size, offset &+ length) - 1) / granularity
        var c = offset / granularity
        while c <= last { if isDirty(chunk: c) { return true }; c += 1 }
        return false
    }

    /// Number of dirty chunks.
    public var dirtyChunks: UInt64 { words.reduce(0) { $0 + UInt64($1.nonzeroBitCount) } }

    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// Sets (or clears) chunks [first, first + count), clipped to the bitmap.
    public mutating func set(chunks first: UInt64, count: UInt64, to value: Bool = true) {
        let end = min(chunkCount, first &+ count)
        var c = first
        while c < end {
            let w = Int(c >> 6), bit = c & 63
            let n = min(64 - bit, end - c)
            let mask: UInt64 = n == 64 ? .max : ((1 << n) - 1) << bit
            if value { words[w] |= mask } else { words[w] &= ~mask }
            c += n
        }
    }

    /// Marks the guest range dirty: every chunk it touches (QEMU's hbitmap_set rounds outward).
    public mutating func markDirty(offset: UInt64, length: UInt64) {
        guard length > 0, offset < size else { return }
        let first = offset / granularity
        let last = (min(size, offset &+ length) - 1) / granularity
        set(chunks: first, count: last - first + 1)
    }

    /// Clears every bit (`bitmap --clear`).
    public mutating func clearAll() {
        for i in words.indices { words[i] = 0 }
    }

    /// The dirty guest ranges, merged, in order.
    public func dirtyRanges() -> [(offset: UInt64, length: UInt64)] {
        var result: [(offset: UInt64, length: UInt64)] = []
        var c: UInt64 = 0
        let count = chunkCount
        while c < count {
            let w = words[Int(c >> 6)] >> (c & 63)
            if w == 0 { c = (c | 63) + 1; continue }
            if w & 1 == 0 { c += UInt64(w.trailingZeroBitCount); continue }
            let start = c
            while c < count && isDirty(chunk: c) { c += 1 }
            let offset = start * granularity
            result.append((offset, min(size, c * granularity) - offset))
        }
        return result
    }

    /// ORs `other` in (QEMU's hbitmap_merge): word by word at the same granularity, else every
    /// dirty range of `other` marked here (hbitmap_sparse_merge). The sizes must be equal; the
    /// caller words the refusal.
    public mutating func merge(_ other: DirtyBitmap) {
        precondition(other.size == size, "merging bitmaps of different sizes")
        if other.granularity == granularity {
            for i in words.indices { words[i] |= other.words[i] }
        } else {
            for range in other.dirtyRanges() { markDirty(offset: range.offset, length: range.length) }
        }
    }

    /// Follows a resize of the guest: new chunks are clean, chunks past a smaller end dropped
    /// (QEMU's hbitmap_truncate). A partial last chunk that becomes whole keeps its bit.
    public mutating func resize(to newSize: UInt64) {
        size = newSize
        let count = chunkCount
        let wordCount = Int((count + 63) / 64)
        if wordCount < words.count { words.removeLast(words.count - wordCount) }
        if wordCount > words.count { words += [UInt64](repeating: 0, count: wordCount - words.count) }
        if count % 64 != 0, let last = words.indices.last { words[last] &= (1 << (count % 64)) - 1 }
    }

    // MARK: - Serialization (QEMU's byte order)

    /// Bytes of the serialized bitmap from byte `start`, `count` of them (zeros past the end).
    public func serializedBytes(from start: Int, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        for i in 0..<count {
            let byte = start + i
            let w = byte >> 3
            guard w < words.count else { break }
            out[i] = UInt8(truncatingIfNeeded: words[w] >> UInt64((byte & 7) * 8))
        }
        return out
    }

    /// Sets bits from serialized bytes placed at byte `start` (bits past the end ignored).
    public mutating func deserialize(_ bytes: [UInt8], at start: Int) {
        for (i, value) in bytes.enumerated() where value != 0 {
            let byte = start + i
            let w = byte >> 3
            guard w < words.count else { break }
            words[w] |= UInt64(value) << UInt64((byte & 7) * 8)
        }
        // Keep the invariant: nothing past the last chunk.
        let count = chunkCount
        if count % 64 != 0, let last = words.indices.last { words[last] &= (1 << (count % 64)) - 1 }
    }

    /// Serialized length in bytes (QEMU rounds to whole 64-bit words).
    public var serializedSize: Int { words.count * 8 }
}
