import Glibc

/// A fixed set of equally sized, aligned I/O buffers allocated once up front.
///
/// `acquire`/`release` only push and pop an index under a lock, so the data path never
/// allocates. All buffers live in one aligned allocation owned by the pool; a buffer's memory
/// stays valid as long as the pool does.
public final class BufferPool: @unchecked Sendable {
    // @unchecked Sendable: the free list is only touched under `lock`; the memory is fixed.

    /// One buffer handed out by the pool. Give it back with `release`.
    public struct Buffer: @unchecked Sendable {
        // @unchecked Sendable: a plain pointer and an index; ownership is the caller's protocol.
        public let index: Int
        public let bytes: UnsafeMutableRawBufferPointer
        public var baseAddress: UnsafeMutableRawPointer { bytes.baseAddress! }  // never empty
    }

    public let bufferSize: Int
    public let capacity: Int
    public let alignment: Int
    private let storage: AlignedBuffer
    private let lock = ConditionLock()
    /// Stack of free indices; `freeCount` entries are valid.
    private let freeList: UnsafeMutablePointer<Int>
    private var freeCount: Int
    /// Whether each buffer is out, to catch double releases.
    private let isOut: UnsafeMutablePointer<Bool>

    /// Allocates `count` buffers of at least `bufferSize` bytes (rounded up to `alignment`).
    public init(count: Int, bufferSize: Int, alignment: Int = DiskFile.pageSize) throws {
        precondition(count > 0 && bufferSize > 0, "a buffer pool needs at least one non-empty buffer")
        let align = AlignedBuffer.validAlignment(alignment)
        guard let size = AlignedBuffer.roundUp(bufferSize, to: align) else {
            throw AllocationError(byteCount: bufferSize, alignment: align, code: EOVERFLOW)
        }
        let (total, overflow) = size.multipliedReportingOverflow(by: count)
        if overflow { throw AllocationError(byteCount: Int.max, alignment: align, code: EOVERFLOW) }
        storage = try AlignedBuffer(byteCount: total, alignment: align)
        self.bufferSize = size
        self.capacity = count
        self.alignment = align
        freeList = .allocate(capacity: count)
        isOut = .allocate(capacity: count)
        isOut.initialize(repeating: false, count: count)
        // Lowest index on top, so buffers are handed out in address order at first.
        for i in 0..<count { freeList[i] = count - 1 - i }
        freeCount = count
    }

    deinit {
        freeList.deallocate()
        isOut.deallocate()
    }

    /// Buffers currently free.
    public var available: Int { lock.withLock { freeCount } }

    /// A free buffer, or nil if all are in use.
    public func tryAcquire() -> Buffer? {
        lock.lock()
        defer { lock.unlock() }
        return popLocked()
    }

    /// A free buffer, waiting for another thread to release one if all are in use.
    /// Only call this when some other thread will release a buffer, or it waits forever.
    public func acquire() -> Buffer {
        lock.lock()
        defer { lock.unlock() }
        while true {
            if let buffer = popLocked() { return buffer }
            lock.wait()
        }
    }

    /// Returns a buffer to the pool. Releasing a buffer twice, or one from another pool, traps:
    /// that is a programming error that would otherwise corrupt data.
    public func release(_ buffer: Buffer) {
        precondition(buffer.index >= 0 && buffer.index < capacity
                     && buffer.bytes.baseAddress == storage.baseAddress + buffer.index * bufferSize,
                     "buffer does not belong to this pool")
        lock.lock()
        defer { lock.unlock() }
        precondition(isOut[buffer.index], "buffer released twice")
        isOut[buffer.index] = false
        freeList[freeCount] = buffer.index
        freeCount += 1
        lock.broadcast()
    }

    /// The buffer with the given index (whether or not it is out), for callers that track
    /// buffers by index.
    public func buffer(at index: Int) -> Buffer {
        precondition(index >= 0 && index < capacity, "buffer index out of range")
        // Sound: index < capacity and the storage holds capacity * bufferSize bytes.
        return Buffer(index: index,
                      bytes: UnsafeMutableRawBufferPointer(start: storage.baseAddress + index * bufferSize,
                                                           count: bufferSize))
    }

    private func popLocked() -> Buffer? {
        guard freeCount > 0 else { return nil }
        freeCount -= 1
        let index = freeList[freeCount]
        isOut[index] = true
        return buffer(at: index)
    }
}
