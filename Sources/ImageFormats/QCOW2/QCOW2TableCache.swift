import DiskIO

/// A write-back cache of one-cluster metadata tables (L2 tables, refcount blocks), keyed by
/// their host offset in the qcow2 file, evicting the least recently used table when full.
///
/// Tables are held as `[UInt64]`: each 8-byte big-endian word of the cluster decoded to a native
/// integer (for extended L2 tables, entry i is words 2i (the entry) and 2i+1 (the bitmap); for
/// refcount blocks use `refcount(in:index:order:)` / `setRefcount`). Writing a table encodes the
/// words back to big-endian bytes.
///
/// Not thread-safe: owned by one image, driven by one thread.
final class QCOW2TableCache {
    /// A cached table, linked into the recency list (most recent at `head`).
    private final class Slot {
        let offset: UInt64
        var words: [UInt64]
        var dirty = false
        // Strong links both ways: unlink and deinit clear them, so no cycle outlives the cache.
        var newer: Slot?
        var older: Slot?
        init(offset: UInt64, words: [UInt64]) {
            self.offset = offset
            self.words = words
        }
    }

    let file: DiskFile
    /// Bytes per table (the cluster size).
    let tableSize: Int
    /// Most tables kept at once (at least 2).
    let capacity: Int
    /// Called before a dirty table is written back (by eviction or `flush`). The write path
    /// sets it to flush refcount blocks first, so refcounts reach the disk before the tables
    /// that use them.
    var beforeWriteback: (() throws -> Void)?

    private var slots: [UInt64: Slot] = [:]
    private var head: Slot?  // most recently used
    private var tail: Slot?  // least recently used

    /// `budgetBytes`: memory to use; the capacity is that many tables, at least 2.
    init(file: DiskFile, tableSize: Int, budgetBytes: Int = 4 << 20) {
        self.file = file
        self.tableSize = tableSize
        self.capacity = max(2, budgetBytes / tableSize)
    }

    deinit {
        // Break the list's links so the slots are freed.
        var s = head
        while let current = s { s = current.older; current.older = nil; current.newer = nil }
    }

    var dirtyCount: Int { slots.values.reduce(0) { $0 + ($1.dirty ? 1 : 0) } }

    /// Whether the table at `offset` is cached (for tests and the writer's bookkeeping).
    func contains(_ offset: UInt64) -> Bool { head?.offset == offset || slots[offset] != nil }

    /// The table at `offset`, read from the file if not cached (bytes past EOF read as zero).
    func table(at offset: UInt64) throws -> [UInt64] {
        try slot(at: offset).words
    }

    /// One entry (word index) of the table at `offset`.
    func word(at offset: UInt64, index: Int) throws -> UInt64 {
        try slot(at: offset).words[index]
    }

    /// Modifies the table at `offset` in place and marks it dirty.
    @discardableResult
    func update<R>(at offset: UInt64, _ body: (inout [UInt64]) throws -> R) throws -> R {
        let s = try slot(at: offset)
        s.dirty = true
        return try body(&s.words)
    }

    /// Puts a new table in the cache without reading the file (for a newly allocated cluster),
    /// marked dirty unless told otherwise. Replaces any cached copy.
    func install(at offset: UInt64, words: [UInt64], dirty: Bool = true) throws {
        precondition(words.count == tableSize / 8, "table of the wrong size")
        if let existing = slots[offset] {
            existing.words = words
            existing.dirty = dirty
            touch(existing)
            return
        }
        try makeRoom()
        let s = Slot(offset: offset, words: words)
        s.dirty = dirty
        insert(s)
    }

    func markDirty(_ offset: UInt64) {
        slots[offset]?.dirty = true
    }

    /// Writes every dirty table (after calling `beforeWriteback` once if any is dirty).
    func flush() throws {
        let dirty = slots.values.filter(\.dirty).sorted { $0.offset < $1.offset }
        guard !dirty.isEmpty else { return }
        try beforeWriteback?()
        for s in dirty { try writeBack(s) }
    }

    /// Drops a table from the cache without writing it (after freeing its cluster).
    func forget(_ offset: UInt64) {
        if let s = slots[offset] { remove(s) }
    }

    /// Drops every clean table (keeps dirty ones).
    func dropClean() {
        for s in slots.values where !s.dirty { remove(s) }
    }

    private func slot(at offset: UInt64) throws -> Slot {
        // The table asked last is asked again and again by walks (one call per map entry):
        // it is at the head, found without hashing.
        if let h = head, h.offset == offset { return h }
        if let s = slots[offset] {
            touch(s)
            return s
        }
        try makeRoom()
        let s = Slot(offset: offset, words: try file.qcow2ReadWords(count: tableSize / 8, at: offset))
        insert(s)
        return s
    }

    private func makeRoom() throws {
        while slots.count >= capacity, let victim = tail {
            if victim.dirty {
                try beforeWriteback?()
                try writeBack(victim)
            }
            remove(victim)
        }
    }

    private func writeBack(_ s: Slot) throws {
        try file.qcow2Write(QCOW2BE.bytes(s.words), at: s.offset)
        s.dirty = false
    }

    // Recency list.

    private func insert(_ s: Slot) {
        slots[s.offset] = s
        s.older = head
        s.newer = nil
        head?.newer = s
        head = s
        if tail == nil { tail = s }
    }

    private func unlink(_ s: Slot) {
        if let newer = s.newer { newer.older = s.older } else { head = s.older }
        if let older = s.older { older.newer = s.newer } else { tail = s.newer }
        s.newer = nil
        s.older = nil
    }

    private func touch(_ s: Slot) {
        guard head !== s else { return }
        unlink(s)
        s.older = head
        head?.newer = s
        head = s
        if tail == nil { tail = s }
    }

    private func remove(_ s: Slot) {
        unlink(s)
        slots[s.offset] = nil
    }

    // MARK: - Refcount block entries in decoded words

    /// Entry `index` of a refcount block held as decoded words, for refcount_bits = 1 << order.
    /// Sub-byte widths count bits from the least significant bit of each byte (spec).
    static func refcount(in words: [UInt64], index: Int, order: Int) -> UInt64 {
        let (w, shift, mask) = refcountPosition(index: index, order: order)
        return (words[w] >> shift) & mask
    }

    static func setRefcount(in words: inout [UInt64], index: Int, order: Int, value: UInt64) {
        let (w, shift, mask) = refcountPosition(index: index, order: order)
        words[w] = (words[w] & ~(mask << shift)) | ((value & mask) << shift)
    }

    private static func refcountPosition(index: Int, order: Int) -> (word: Int, shift: UInt64, mask: UInt64) {
        let bits = 1 << order
        let mask: UInt64 = bits == 64 ? .max : (1 << UInt64(bits)) - 1
        let bitOffset = index * bits            // from the start of the block
        let byteInBlock = bitOffset / 8
        let word = byteInBlock / 8
        // Byte k of a big-endian word holds bits 56-8k...63-8k of the decoded value.
        let byteShift = UInt64(56 - 8 * (byteInBlock % 8))
        if bits >= 8 {
            // A multi-byte big-endian entry: its last byte is the least significant one.
            let lastByte = (bitOffset + bits) / 8 - 1
            return (word, UInt64(56 - 8 * (lastByte % 8)), mask)
        }
        return (word, byteShift + UInt64(bitOffset % 8), mask)
    }
}
