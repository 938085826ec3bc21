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
///   its write engine, at that offset of that file (raw: the same offset; a qcow2 target could
///   allocate fresh clusters and return their host offset). The target must have made the
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
    func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (file: DiskFile, offset: UInt64)?
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
    /// Cache mode unsafe (QEMU's cache.no-flush; convert's default): nothing is ever synced to
    /// stable storage (no fdatasync, also not between metadata writes). Write order, which is
    /// what survives a kill, stays as it is. Set before the first write.
    var ignoresFlushes: Bool { get set }
}

extension ConvertTarget {
    /// Targets whose async places need no follow-up (raw: the same offset, nothing to map).
    public func asyncWriteCompleted(at offset: UInt64) throws {}
    public var placementGranularity: Int { writeGranularity }
}

// MARK: - raw

/// A raw output file. Fresh: holes stay holes (the file was created sparse at its size).
/// Existing (`-n`), or a device (never created, it holds old data): zero ranges are punched
/// (on a block device: zeroed, BLKZEROOUT's guarantee) or zeroed in place, or written as zeros.
public final class RawTarget: ConvertTarget {
    public let image: RawImage
    public let path: String
    public let virtualSize: UInt64
    public let writeGranularity: Int
    public var isDirect: Bool { image.file.isDirect }
    public var writesAsynchronously: Bool { true }
    /// Whether unwritten ranges read as zeros (a fresh regular file or --target-is-zero).
    public let startsZeroed: Bool
    /// The real end of the file: O_DIRECT writes may not be rounded past it.
    private let fileSize: UInt64
    /// A buffered descriptor for the unaligned tail of an O_DIRECT file (opened on first use).
    private var tailFile: DiskFile?
    /// Cache mode unsafe: `finish` does not sync to stable storage, as in QEMU.
    public var ignoresFlushes = false

    /// Opens `path` (an existing raw image: a file or device name, or a json: name of a
    /// window of one) as the target. `direct` = cache mode none/directsync.
    /// `startsZeroed`: the file was just created (or `assumeZero`, --target-is-zero, says so).
    /// A created device still holds its old data, so it does not start zeroed unless the
    /// user says it does.
    public init(path: String, direct: Bool, startsZeroed: Bool, assumeZero: Bool = false) throws {
        let location = try ImageName.parse(path)
        // file: and host_device: names hold to their driver's kind of file, as when opened.
        try ImageOpener.checkProtocolDriver(location)
        image = try RawImage.open(location: location, writable: true, direct: direct)
        self.path = path
        virtualSize = image.virtualSize
        fileSize = try image.file.size()
        writeGranularity = direct ? image.file.dioAlignment().offset : 1
        let onDevice = try image.file.kind().isDevice
        self.startsZeroed = assumeZero || (startsZeroed && !onDevice)
    }

    public func readsAsZero(at offset: UInt64, length: UInt64) -> Bool { startsZeroed }

    public func asyncDestination(forWriteAt offset: UInt64, length: Int) -> (file: DiskFile, offset: UInt64)? {
        // In the file, guest byte 0 is at the window's offset (0 but for a json: window).
        let host = image.windowOffset + offset
        guard image.file.isDirect else { return (image.file, host) }
        let unit = UInt64(writeGranularity)
        // O_DIRECT needs aligned offset and length; the unaligned tail goes through `write`.
        guard host % unit == 0, UInt64(length) % unit == 0, host + UInt64(length) <= fileSize else { return nil }
        return (image.file, host)
    }

    public func write(_ data: UnsafeRawBufferPointer, at guestOffset: UInt64) throws {
        let offset = image.windowOffset + guestOffset
        guard image.file.isDirect else {
            try image.file.write(data, at: offset)
            return
        }
        let unit = UInt64(writeGranularity)
        let alignedLength = UInt64(data.count) / unit * unit
        if offset % unit == 0 && alignedLength > 0, let pointer = data.baseAddress,
           Int(bitPattern: pointer) % DiskFile.pageSize == 0 {
            // Sound: alignedLength <= data.count.
            try image.file.write(UnsafeRawBufferPointer(start: pointer, count: Int(alignedLength)), at: offset)
            if alignedLength == UInt64(data.count) { return }
            // Sound: alignedLength < data.count, so the rebased slice is inside `data`.
            try buffered().write(UnsafeRawBufferPointer(rebasing: data[Int(alignedLength)...]), at: offset + alignedLength)
            return
        }
        try buffered().write(data, at: offset)
    }

    /// The same open file without O_DIRECT (a new description of the same inode, never the
    /// name opened again: a rename in between must not redirect the tail's writes).
    private func buffered() throws -> DiskFile {
        if let tailFile { return tailFile }
        let file = try image.file.reopen(direct: false)
        tailFile = file
        return file
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try image.writeZeroes(at: offset, length: length)
    }

    public func finish() throws {
        if !ignoresFlushes {
            try image.flush()
            if let tailFile { try tailFile.sync() }
        }
        tailFile?.close()
        if !ignoresFlushes {
            try image.close()
        } else {
            // RawImage.close would sync; the descriptor alone is closed instead.
            image.file.close()
        }
    }

    public func abandon() {
        tailFile?.close()
        try? image.close()
    }
}

// MARK: - qcow2 (generic)

/// A qcow2 output written through `QCOW2Image.write` in large chunks: the write path gives a
/// large write one contiguous run of new host clusters. Zeros on a fresh image without a
/// backing file are skipped, so nothing is allocated for them.
///
/// `QCOW2AsyncTarget` (QCOW2TargetAsync.swift) adds the fast path: fresh chunks mapped to new
/// host runs that the pipeline writes itself (`asyncDestination`).
open class QCOW2Target: ConvertTarget {
    public let image: QCOW2Image
    public let path: String
    public let virtualSize: UInt64
    public let writeGranularity: Int
    /// Reservations for the pipeline's own writes are whole clusters.
    public var placementGranularity: Int { image.clusterSize }
    public var isDirect: Bool { image.file.isDirect }
    open var writesAsynchronously: Bool { false }
    public let startsZeroed: Bool
    /// Guest data lives on a device: clusters allocated there (preallocation=metadata) map
    /// whatever the device held, so only unallocated ranges of a fresh image read as zeros.
    private let dataOnDevice: Bool

    /// Cache mode unsafe: the image's write path skips every fdatasync (`QCOW2Image.ignoresFlushes`).
    public var ignoresFlushes: Bool {
        get { image.ignoresFlushes }
        set { image.ignoresFlushes = newValue }
    }

    /// `image` opened writable, with its backing chain if it has one. `startsZeroed`: a fresh
    /// image (or --target-is-zero); ignored where a backing file covers the range.
    /// `wholeClusters`: writes come in whole clusters even with extended L2 entries (else
    /// the subcluster is the unit, so a subcluster the source does not have is never written:
    /// it stays unallocated in the L2 bitmap, as qemu-img leaves it).
    public init(image: QCOW2Image, startsZeroed: Bool, wholeClusters: Bool = false) {
        self.image = image
        path = image.path
        virtualSize = image.virtualSize
        let header = image.qcow2Header
        writeGranularity = header.hasExtendedL2 && !wholeClusters ? header.subclusterSize : image.clusterSize
        self.startsZeroed = startsZeroed
        dataOnDevice = (try? image.dataFile.kind().isDevice) ?? true
    }

    open func readsAsZero(at offset: UInt64, length: UInt64) -> Bool {
        guard startsZeroed else { return false }
        if dataOnDevice && !rangeIsUnallocated(at: offset, length: length) { return false }
        if image.qcow2Header.backingFileName == nil { return true }
        // A backing file shows through unallocated clusters: only past its end is it zero.
        guard let backing = image.backing else { return false }
        return offset >= backing.virtualSize
    }

    /// Whether no cluster of the range is allocated in the image itself (a failed query: no).
    private func rangeIsUnallocated(at offset: UInt64, length: UInt64) -> Bool {
        var at = offset
        let end = min(offset + length, virtualSize)
        while at < end {
            guard let extent = try? image.blockStatus(at: at, length: end - at), extent.length > 0 else { return false }
            switch extent.kind {
            case .data, .compressed: return false
            case .zero, .hole, .backing: at = extent.end
            }
        }
        return true
    }

    /// nil: writes go through `write`. A subclass may reserve fresh clusters here (see
    /// `QCOW2Image.reserveForDirectWrite`), return their host place, and say
    /// `writesAsynchronously`, so the pipeline writes the data without a copy; it maps them
    /// in `asyncWriteCompleted`, once the data is there.
    open func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (file: DiskFile, offset: UInt64)? { nil }

    open func asyncWriteCompleted(at offset: UInt64) throws {}

    open func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try image.write(data, at: offset)
    }

    /// The source's zeros: host clusters the target held there are given back (qemu-img
    /// convert's zero writes may unmap), so `-n` over an image with data frees them.
    open func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try image.writeZeroes(at: offset, length: length, mayUnmap: true)
    }

    open func finish() throws {
        try image.flush()
        try image.close()
    }

    open func abandon() {
        try? image.close()
    }
}
