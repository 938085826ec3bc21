import DiskIO
import Glibc
import ImageFormats

/// What a commit copied.
public struct CommitStats: Sendable, Equatable {
    /// Guest bytes read from the layers above the base and written into it.
    public var bytesWritten: UInt64 = 0
    /// Guest bytes made to read as zeros in the base (zeros the layers above record).
    public var bytesZeroed: UInt64 = 0
    public init() {}
}

/// The data half of `commit`: everything the layers above the base hold (the top and, with
/// `-b`, every intermediate image) is written into the base, so any format works as a base.
/// Zeros a layer records become zeros in the base (never the base's old data); ranges no
/// layer above the base allocates are left alone. Runs of data (from any layers) are
/// gathered into pooled buffers of `bufferSize` bytes and handed to a `CommitWriter`, which
/// keeps up to `depth` of them in flight (in places the base reserves, mapped once written;
/// else through the base's own `write`) while the next runs are read.
///
/// Nothing here changes the top: until it is emptied, the chain reads as before whatever
/// the base holds of it (a kill leaves the base partly updated, the top's view intact).
public enum CommitCopier {
    /// `top` is opened with its chain; `baseDepth` is the base's depth in it (1: the
    /// immediate backing file); `base` is the base opened writable, at least as large as the
    /// top. `rateLimit` in bytes per second (0: none), as qemu's block job speed.
    public static func copy(top: any DiskImage, baseDepth: Int, into base: any DiskImage,
                            bufferSize: Int = 2 << 20, depth: Int = 8, rateLimit: UInt64 = 0,
                            progress: ((UInt64, UInt64) -> Void)? = nil) throws -> CommitStats {
        precondition(baseDepth >= 1)
        let writer = try CommitWriter(base: base, bufferSize: bufferSize, depth: max(depth, 2))
        // Every write has ended before the buffers go (and before the caller uses the base).
        defer { writer.close() }
        var run = Run(writer: writer, rate: RateLimiter(rate: rateLimit))
        let size = top.virtualSize
        let walker = ChainWalker(top: top)
        // The base as the chain saw it before a commit grew it: past its old end it reads
        // zeros after the growth already, and qemu writes nothing there (a zero write would
        // mark the base's dirty bitmaps where qemu's commit leaves them clean).
        var below: (any DiskImage)? = top
        for _ in 0..<baseDepth { below = below?.backing }
        let oldBaseEnd = below?.virtualSize ?? size
        progress?(0, size)
        guard size > 0 else { return run.stats }
        do {
            try walker.walk(from: 0, length: size, maxDepth: baseDepth - 1) { extent in
                try Interruption.check(image: top.path, outcome: "was not committed (it reads as before)")
                switch extent.kind {
                case .backing:
                    // The base (or below it) decides this range: nothing to copy.
                    try run.write()
                case .zero, .hole:
                    // Recorded zeros (or a layer above the base that ends before here): the
                    // base must read zeros too; qemu's commit zero writes may unmap.
                    try run.write()
                    if case .hole = extent.kind, extent.offset >= oldBaseEnd { break }
                    try writer.writeZeroes(at: extent.offset, length: extent.length)
                    run.stats.bytesZeroed += extent.length
                case .data, .compressed:
                    guard let layer = extent.layer else { return }
                    var at = extent.offset
                    while at < extent.end {
                        if run.isFull || (run.count > 0 && run.end != at) { try run.write() }
                        let n = min(extent.end - at, UInt64(try run.room()))
                        try run.read(from: layer, at: at, count: Int(n))
                        at += n
                    }
                }
                if extent.end < size { progress?(extent.end, size) }
            }
            try run.write()
        } catch {
            run.giveBack()
            throw error
        }
        try writer.drain()
        return run.stats
    }

    /// Runs `body` (a write into the base at guest `offset`), failures worded as qemu's
    /// commit job reports a write error of its target, with the base's name.
    static func writing<T>(_ base: any DiskImage, at offset: UInt64, _ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as IOError {
            throw ImageError(path: base.path, message: "Could not write to the base image at byte \(offset)", cause: error)
        }
    }

    /// One run of data being gathered: guest bytes [start, start + count) in a pooled buffer.
    private struct Run {
        let writer: CommitWriter
        var rate: RateLimiter
        var buffer: BufferPool.Buffer?
        var start: UInt64 = 0
        var count = 0
        var stats = CommitStats()

        init(writer: CommitWriter, rate: RateLimiter) {
            self.writer = writer
            self.rate = rate
        }

        var end: UInt64 { start + UInt64(count) }
        var isFull: Bool { buffer != nil && count == writer.pool.bufferSize }

        /// Room left in the run's buffer (a buffer taken first if the run has none).
        mutating func room() throws -> Int {
            if buffer == nil { buffer = try writer.acquire() }
            return writer.pool.bufferSize - count
        }

        /// Appends `count` bytes of `layer` at guest `offset` (which must be `end`, or the
        /// run empty; `room()` taken first).
        mutating func read(from layer: any DiskImage, at offset: UInt64, count n: Int) throws {
            guard let buffer else { return }
            if count == 0 { start = offset }
            // Sound: count + n <= the buffer's size (n <= room()).
            let part = UnsafeMutableRawBufferPointer(start: buffer.baseAddress + count, count: n)
            try layer.read(into: part, at: offset)
            count += n
        }

        /// Hands the gathered run to the writer (nothing if empty).
        mutating func write() throws {
            guard count > 0, let buffer else { return }
            let n = count
            self.buffer = nil
            count = 0
            try writer.write(buffer, count: n, at: start)
            stats.bytesWritten += UInt64(n)
            // -r: the average speed kept at or under the rate by waiting after each write.
            rate.account(UInt64(n))
            rate.wait()
        }

        /// After a failure: the buffer being filled goes back unwritten.
        mutating func giveBack() {
            if let buffer { writer.pool.release(buffer) }
            buffer = nil
            count = 0
        }
    }
}
