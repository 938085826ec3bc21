import DiskIO
import ImageFormats

/// Where the convert pipeline writes: the output image, seen as a guest address space.
///
/// How the pipeline drives a target (the contract implementations rely on):
/// - Writes come in guest order, in chunks of at most the pipeline's buffer size. A chunk
///   starts and ends on a multiple of `writeGranularity` except where a chunk ends at the end
///   of the image (or, with `-S` smaller than the granularity, never: the pipeline rounds its
///   zero detection up to `writeGranularity`). A compressing target can therefore compress each
///   whole cluster of a `write` on its own, in parallel, before returning.
/// - Ranges that read as zeros are either skipped (when `readsAsZero(at:length:)` says the target
///   already reads as zeros there) or passed to `writeZeroes`; they never reach `write`.
///   A long zero range (no buffer needed) may be zeroed before earlier chunks still being read
///   are written; ranges never overlap.
/// - With `-B` (target keeps a backing file) ranges the source does not allocate in its top
///   layer are neither written nor zeroed: they keep reading from the target's backing file.
/// - `write` is synchronous unless `asyncDestination(forWriteAt:length:)` returns a place: then
///   the pipeline writes those bytes itself, straight from its buffer, asynchronously through
///   its write engine, at that offset of that file (raw: the same offset; qcow2: fresh
///   clusters allocated for it, their host offset). The target must have made the
///   place ready (host clusters reserved) before returning it. Once that write has completed
///   successfully the pipeline calls `asyncWriteCompleted(at:)` with the same guest offset
///   (on its own thread, between other calls): a qcow2 target maps the range only then, so
///   its metadata never points at data still in flight (crash consistency).
/// - `finish()` is called once at the end, after every write has completed (not after an error).
///
/// A target is driven by one thread (the pipeline's) except for the async file writes, which
/// the IOEngine performs on that file.
public protocol ConvertTarget: AnyObject {
    /// The output file name (for messages).
    var path: String { get }
    /// Guest size of the output.
    var virtualSize: UInt64 { get }
    /// The unit the target wants whole: qcow2's cluster size (its subcluster size with
    /// extended L2 entries, which allocate per subcluster: zeros are then found, and left
    /// unwritten, at that granularity), a raw file's O_DIRECT offset alignment (1 when
    /// buffered). A power of two.
    var writeGranularity: Int { get }
    /// The unit `asyncDestination` places writes in, a multiple of `writeGranularity`: the
    /// pipeline splits a data run at its multiples, so the whole units in the middle can be
    /// placed even when the run starts or ends inside one (qcow2 with extended L2 entries: the
    /// cluster, while the write granularity is the subcluster). By default the granularity.
    var placementGranularity: Int { get }
    /// Whether the target's file is opened with O_DIRECT (the pipeline then prefers Linux AIO).
    var isDirect: Bool { get }
    /// Where `asyncDestination`'s places are, for a target that `writesAsynchronously` (the
    /// pipeline sets up the write engine this endpoint prefers); nil for one that never does.
    var writeEndpoint: (any BlockEndpoint)? { get }
    /// Whether `asyncDestination(forWriteAt:length:)` may return a place (the pipeline then
    /// sets up an engine for the writes, Linux AIO when `isDirect`).
    var writesAsynchronously: Bool { get }
    /// True when the range already reads as zeros in the target (a fresh image without a
    /// backing file, or `--target-is-zero`): zeros there need not be written.
    func readsAsZero(at offset: UInt64, length: UInt64) -> Bool
    /// Where the pipeline may write `length` bytes of guest `offset` itself (a file and the
    /// offset in it; async through its write engine; the buffer is page-aligned, and so are
    /// offset and length where `isDirect` unless nil is returned), or nil when the pipeline
    /// must call `write`.
    func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (endpoint: any BlockEndpoint, offset: UInt64)?
    /// The asynchronous write of the range `asyncDestination(forWriteAt: offset, ...)` placed
    /// has completed successfully. Not called for failed writes.
    func asyncWriteCompleted(at offset: UInt64) throws
    /// Writes `data` at guest `offset`. Synchronous: `data` may be reused once this returns.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes the range read as zeros (also over a backing file), allocating as little as possible.
    func writeZeroes(at offset: UInt64, length: UInt64) throws
    /// Flushes metadata and data to stable storage and closes the target.
    func finish() throws
    /// Closes without flushing metadata obligations beyond what is safe (after an error).
    func abandon()
}

extension ConvertTarget {
    /// Targets whose async places need no follow-up (raw: the same offset, nothing to map).
    public func asyncWriteCompleted(at offset: UInt64) throws {}
    public var placementGranularity: Int { writeGranularity }
    public var writeEndpoint: (any BlockEndpoint)? { nil }
}
