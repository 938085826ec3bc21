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
/// `-b`, every intermediate image) is written into the base through the base's own
/// `write`/`writeZeroes`, so any format works as a base. Zeros a layer records become zeros
/// in the base (never the base's old data); ranges no layer above the base allocates are
/// left alone. Runs of data (from any layers) are gathered into one large buffer and
/// written with one call, on a writer thread (`WriteBehind`) while the next run is read into
/// the other buffer; the base is only touched by that thread until the copy returns.
///
/// Nothing here changes the top: until it is emptied, the chain reads as before whatever
/// the base holds of it (a kill leaves the base partly updated, the top's view intact).
public enum CommitCopier {
    /// `top` is opened with its chain; `baseDepth` is the base's depth in it (1: the
    /// immediate backing file); `base` is the base opened writable, at least as large as the
    /// top. `rateLimit` in bytes per second (0: none), as qemu's block job speed.
    public static func copy(top: any DiskImage, baseDepth: Int, into base: any DiskImage,
                            bufferSize: Int = 8 << 20, rateLimit: UInt64 = 0,
                            progress: ((UInt64, UInt64) -> Void)? = nil) throws -> CommitStats {
        precondition(baseDepth >= 1)
        let buffers = (0..<2).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096) }
        let writer = try WriteBehind()
        defer {
            // Every write has ended before the buffers go (and before the caller uses the base).
            writer.finish()
            for buffer in buffers { buffer.deallocate() }
        }
        var run = Run(base: base, buffers: buffers, writer: writer, rate: RateLimiter(rate: rateLimit))
        let size = top.virtualSize
        let walker = ChainWalker(top: top)
        let unmapping = base as? any UnmappingZeroWrites
        // The base as the chain saw it before a commit grew it: past its old end it reads
        // zeros after the growth already, and qemu writes nothing there (a zero write would
        // mark the base's dirty bitmaps where qemu's commit leaves them clean).
        var below: (any DiskImage)? = top
        for _ in 0..<baseDepth { below = below?.backing }
        let oldBaseEnd = below?.virtualSize ?? size
        progress?(0, size)
        guard size > 0 else { return run.stats }
        try walker.walk(from: 0, length: size, maxDepth: baseDepth - 1) { extent in
            try Interruption.check(image: top.path, outcome: "was not committed (it reads as before)")
            switch extent.kind {
            case .backing:
                // The base (or below it) decides this range: nothing to copy.
                try run.write()
            case .zero, .hole:
                // Recorded zeros (or a layer above the base that ends before here): the base
                // must read zeros too; qemu's commit zero writes may unmap.
                try run.write()
                if case .hole = extent.kind, extent.offset >= oldBaseEnd { break }
                try writer.submit {
                    try writing(base, at: extent.offset) {
                        if let unmapping {
                            try unmapping.writeZeroes(at: extent.offset, length: extent.length, mayUnmap: true)
                        } else {
                            try base.writeZeroes(at: extent.offset, length: extent.length)
                        }
                    }
                }
                run.stats.bytesZeroed += extent.length
            case .data, .compressed:
                guard let layer = extent.layer else { return }
                var at = extent.offset
                while at < extent.end {
                    if run.isFull || (run.count > 0 && run.end != at) { try run.write() }
                    let n = min(extent.end - at, UInt64(run.room))
                    try run.read(from: layer, at: at, count: Int(n))
                    at += n
                }
            }
            if extent.end < size { progress?(extent.end, size) }
        }
        try run.write()
        try writer.drain()
        return run.stats
    }

    /// Runs `body` (a write into the base at guest `offset`), failures worded as qemu's
    /// commit job reports a write error of its target, with the base's name.
    static func writing(_ base: any DiskImage, at offset: UInt64, _ body: () throws -> Void) throws {
        do { try body() } catch let error as IOError {
            throw ImageError(path: base.path, message: "Could not write to the base image at byte \(offset)", cause: error)
        }
    }

    /// One run of data being gathered: guest bytes [start, start + count) in `buffer`, one
    /// of two: the other may be being written by the writer thread.
    private struct Run {
        let base: any DiskImage
        let buffers: [UnsafeMutableRawBufferPointer]
        let writer: WriteBehind
        var rate: RateLimiter
        var current = 0
        var buffer: UnsafeMutableRawBufferPointer { buffers[current] }
        var start: UInt64 = 0
        var count = 0
        var stats = CommitStats()

        var end: UInt64 { start + UInt64(count) }
        var room: Int { buffer.count - count }
        var isFull: Bool { room == 0 }

        /// Appends `count` bytes of `layer` at guest `offset` (which must be `end`, or the
        /// run empty).
        mutating func read(from layer: any DiskImage, at offset: UInt64, count n: Int) throws {
            if count == 0 { start = offset }
            // Sound: count + n <= buffer.count (n <= room).
            let part = UnsafeMutableRawBufferPointer(start: buffer.baseAddress! + count, count: n)
            try layer.read(into: part, at: offset)
            count += n
        }

        /// Hands the gathered run to the writer thread (nothing if empty) and switches to the
        /// other buffer, once the writer is done with it (`submit` waits for the job before).
        mutating func write() throws {
            guard count > 0 else { return }
            let data = UnsafeRawBufferPointer(start: buffer.baseAddress!, count: count)
            let (base, at) = (self.base, start)
            try writer.submit {
                try CommitCopier.writing(base, at: at) { try base.write(data, at: at) }
                // The disk starts on it now rather than all at once in the final flush.
                for file in base.files { file.startWriteback() }
            }
            stats.bytesWritten += UInt64(count)
            rate.account(UInt64(count))
            count = 0
            current = 1 - current
        }
    }

    /// Keeps the average speed at or under `rate` bytes per second by sleeping after writes.
    private struct RateLimiter {
        let rate: UInt64
        var bytes: UInt64 = 0
        var started: Double = 0

        init(rate: UInt64) { self.rate = rate }

        mutating func account(_ n: UInt64) {
            guard rate > 0 else { return }
            if started == 0 { started = RateLimiter.now() }
            bytes += n
            let due = Double(bytes) / Double(rate)
            let elapsed = RateLimiter.now() - started
            if due > elapsed { usleep(UInt32(min(due - elapsed, 1.0) * 1_000_000)) }
        }

        static func now() -> Double {
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
        }
    }
}
