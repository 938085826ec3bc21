import CLinuxShims
import DiskIO
import Glibc

/// A raw image: guest byte N is file byte N (or, for a window a `json:` name's `offset` and
/// `size` describe, file byte `windowOffset` + N).
///
/// The virtual size is the file size (less the window's offset) rounded up to 512 bytes, as
/// QEMU reports it, or the window's size; the part of that last sector past the end of the
/// file reads as zeros.
public final class RawImage: DiskImage {
    public let path: String
    public let file: DiskFile
    /// Where guest byte 0 is in the file (raw's `offset` option).
    public let windowOffset: UInt64
    /// The window's fixed size (raw's `size` option): the image cannot be resized.
    private let windowSize: UInt64?
    /// What info calls the image (QEMU's bs->filename): see ImageLocation.displayName.
    public var displayName: String
    public var format: ImageFormat { .raw }
    public private(set) var virtualSize: UInt64
    public let isWritable: Bool
    public var backing: (any DiskImage)? { nil }
    public var dataFile: DiskFile { file }
    private var isClosed = false
    /// Bounce buffer for O_DIRECT reads the caller did not align; allocated on first use.
    private var bounce: AlignedBuffer?
    /// A buffered descriptor of the same file for O_DIRECT writes the caller did not align
    /// (opened on first use).
    private var tailFile: DiskFile?
    /// The file's end as opened (resize moves it): O_DIRECT writes are never rounded past it.
    var fileEnd: UInt64

    init(path: String, file: DiskFile, writable: Bool, offset: UInt64 = 0, size: UInt64? = nil) throws {
        self.path = path
        self.file = file
        self.isWritable = writable
        self.displayName = path
        let fileSize = try file.size()
        fileEnd = fileSize
        // QEMU's raw_apply_options checks, with its words.
        guard offset <= fileSize else {
            throw ImageError(path: path, message: "Offset (\(offset)) cannot be greater than size of the containing file (\(fileSize))")
        }
        if let size, fileSize - offset < size {
            throw ImageError(path: path, message: "The sum of offset (\(offset)) and size (\(size)) has to be smaller or equal to the  actual size of the containing file (\(fileSize))")
        }
        // A size the file would round up to whole sectors is not the size asked for.
        if let size, size % 512 != 0 {
            throw ImageError(path: path, message: "Specified size is not multiple of 512")
        }
        windowOffset = offset
        windowSize = size
        self.virtualSize = size ?? RawImage.sectorRoundUp(fileSize - offset)
    }

    /// Opens `path` as a raw image. Failure to open the file is an ImageError naming the file
    /// whose `cause` is the IOError ("Could not open 'x': No such file or directory").
    public static func open(path: String, writable: Bool, cache: CacheMode) throws -> RawImage {
        try open(location: ImageLocation(name: path, path: path), writable: writable, cache: cache)
    }

    /// Opens the file `location` names, as the window it describes; errors name the image by
    /// the name it was given (`location.name`), system-call errors the file.
    public static func open(location: ImageLocation, writable: Bool, cache: CacheMode) throws -> RawImage {
        let file: DiskFile
        do {
            file = try DiskFile.open(location.path, access: writable ? .readWrite : .readOnly, cache: cache)
        } catch {
            throw ImageError(path: location.name, message: "could not open the image file", cause: error)
        }
        do {
            return try open(file: file, location: location, writable: writable)
        } catch {
            file.close()
            throw error
        }
    }

    /// The window `location` describes of `file`, already open as `location.path`. On
    /// success the image owns `file`; on failure the caller still owns it.
    static func open(file: DiskFile, location: ImageLocation, writable: Bool) throws -> RawImage {
        let image = try RawImage(path: location.name, file: file, writable: writable,
                                 offset: location.rawOffset, size: location.rawSize)
        image.displayName = location.displayName
        return image
    }

    /// Wraps a file the caller has already opened (e.g. after probing it).
    public static func open(path: String, file: DiskFile) throws -> RawImage {
        try RawImage(path: path, file: file, writable: file.access == .readWrite)
    }

    static func sectorRoundUp(_ size: UInt64) -> UInt64 {
        size > UInt64.max - 511 ? UInt64.max & ~511 : (size + 511) & ~511
    }

    // MARK: - Data

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count), "read")
        guard buffer.count > 0 else { return }
        let n: Int
        if file.takesAsIs(buffer.baseAddress, count: buffer.count, offset: windowOffset + offset) {
            n = try file.read(into: buffer, at: windowOffset + offset)
        } else {
            n = try file.readUnaligned(into: buffer, at: windowOffset + offset, bounce: try bounceBuffer())
        }
        // Past the end of the file but inside the last sector: zeros.
        if n < buffer.count {
            // Sound: n < buffer.count, so the zeroed range lies inside the buffer.
            memset(buffer.baseAddress! + n, 0, buffer.count - n)
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkWritable()
        try checkRange(offset, UInt64(data.count), "write")
        guard data.count > 0 else { return }
        let host = windowOffset + offset
        guard file.isDirect else {
            try file.write(data, at: host)
            return
        }
        let unit = UInt64(file.dioAlignment().offset)
        let alignedLength = UInt64(data.count) / unit * unit
        if host % unit == 0 && alignedLength > 0, let pointer = data.baseAddress,
           Int(bitPattern: pointer) % DiskFile.pageSize == 0 {
            // Sound: alignedLength <= data.count.
            try file.write(UnsafeRawBufferPointer(start: pointer, count: Int(alignedLength)), at: host)
            if alignedLength == UInt64(data.count) { return }
            // The unaligned tail (say the last bytes of a file whose size is no multiple of
            // the unit) through the page cache: an aligned write would grow the file.
            // Sound: alignedLength < data.count, so the rebased slice is inside `data`.
            try buffered().write(UnsafeRawBufferPointer(rebasing: data[Int(alignedLength)...]), at: host + alignedLength)
            return
        }
        try buffered().write(data, at: host)
    }

    /// The same open file without O_DIRECT (a new description of the same inode, never the
    /// name opened again: a rename in between must not redirect the writes).
    private func buffered() throws -> DiskFile {
        if let tailFile { return tailFile }
        let reopened = try file.reopen(cache: file.cache.buffered)
        tailFile = reopened
        return reopened
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkWritable()
        try checkRange(offset, length, "write zeroes to")
        guard length > 0 else { return }
        // A hole allocates nothing and reads as zeros; where the file system cannot punch
        // holes, zero the range in place; failing that, write zeros.
        // EINVAL too: block devices refuse ranges not aligned to their logical block size,
        // and writing zeros is always a correct fallback.
        do {
            try file.punchHole(at: windowOffset + offset, length: length)
            return
        } catch let error as IOError where RawImage.isUnsupported(error) || error.code == EINVAL {}
        do {
            try file.zeroRange(at: windowOffset + offset, length: length)
            return
        } catch let error as IOError where RawImage.isUnsupported(error) || error.code == EINVAL {}
        try writeZeroBuffers(at: offset, length: length)
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkWritable()
        try checkRange(offset, length, "discard")
        guard length > 0 else { return }
        do {
            try file.punchHole(at: windowOffset + offset, length: length)
        } catch let error as IOError where RawImage.isUnsupported(error) || error.code == EINVAL {
            // Discard is advisory: a file system without hole punching (or a block device
            // given an unaligned range) keeps the data.
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
        guard length > 0 else { throw ImageError(path: path, message: "block status of an empty range") }
        try checkRange(offset, length, "query")
        // In file offsets: the window starts at windowOffset.
        let start = windowOffset + offset
        let end = start + length
        let data: UInt64?
        do {
            data = try file.nextData(from: start)
        } catch let error as IOError where error.code == EINVAL || RawImage.isUnsupported(error) {
            // No SEEK_DATA here (e.g. some block devices): everything counts as data.
            return Extent(offset: offset, length: length, kind: .data(hostOffset: start))
        }
        guard let data, data < end else {
            return Extent(offset: offset, length: length, kind: .hole)
        }
        if data > start {
            return Extent(offset: offset, length: data - start, kind: .hole)
        }
        let hole = try file.nextHole(from: start)
        // hole > start here since start is in data; guard against a racing truncate anyway.
        let stop = min(max(hole, start + 1), end)
        return Extent(offset: offset, length: stop - start, kind: .data(hostOffset: start))
    }

    /// Cache mode unsafe: nothing to do (not even the pending-signal check of a sync).
    public func flush() throws {
        guard isWritable, !isClosed, !file.ignoresFlushes else { return }
        try file.sync()
        if let tailFile { try tailFile.sync() }
    }

    public func close() throws {
        guard !isClosed else { return }
        // The buffered descriptor's writes are the same inode's: the file's sync covers them.
        tailFile?.close()
        tailFile = nil
        defer {
            file.close()
            isClosed = true
        }
        try flush()
    }

    /// Changes the file size (and so the virtual size, rounded up to 512 bytes). A device
    /// keeps its size: any other size is QEMU's "Cannot resize device files" (truncate alone
    /// would accept a smaller one without cutting anything).
    public func resize(to newSize: UInt64) throws {
        try checkWritable()
        if try file.kind().isDevice, try newSize != file.size() {
            throw ImageError(path: path, message: "Cannot resize device files")
        }
        // QEMU's raw_co_truncate refuses this too: the window's size is fixed by the name.
        // (A ResizeError: qemu-img prints the sentence without naming the image.)
        if windowSize != nil { throw ResizeError("Cannot resize fixed-size raw disks") }
        guard newSize <= UInt64(Int64.max) - windowOffset else {
            throw ImageError(path: path, message: "The image size is too large for file format 'raw'")
        }
        try file.truncate(to: windowOffset + newSize)
        fileEnd = windowOffset + newSize
        virtualSize = RawImage.sectorRoundUp(newSize)
    }

    public func info() throws -> ImageInfo {
        var info = ImageInfo(filename: displayName, format: "raw", virtualSize: virtualSize)
        info.actualSize = try file.allocatedBytes()
        info.dirtyFlag = false  // qemu-img prints "dirty-flag": false for raw images
        return info
    }

    // MARK: - Helpers

    private func checkWritable() throws {
        if !isWritable { throw ImageError(path: path, message: "the image is opened read-only") }
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64, _ what: String) throws {
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > virtualSize {
            throw ImageError(path: path, message: "cannot \(what) \(length) bytes at offset \(offset): "
                             + "beyond the end of the image (\(virtualSize) bytes)")
        }
    }

    static func isUnsupported(_ error: IOError) -> Bool {
        error.code == EOPNOTSUPP || error.code == ENOSYS || error.code == ENOTTY
    }

    /// The bounce buffer unaligned O_DIRECT reads go through (DiskIO's readUnaligned; writes
    /// send their unaligned tail through the buffered descriptor instead, which never grows
    /// the file), made once: 1 MiB, aligned for the file.
    private func bounceBuffer() throws -> AlignedBuffer {
        if let bounce { return bounce }
        let dio = file.dioAlignment()
        let made = try AlignedBuffer(byteCount: 1 << 20, alignment: max(dio.memory, dio.offset))
        bounce = made
        return made
    }

    private func writeZeroBuffers(at offset: UInt64, length: UInt64) throws {
        let zeros = try ZeroBuffer.get()
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(zeros.count), length - done))
            // Direct files get aligned pieces; an unaligned tail goes through the buffered file.
            try write(UnsafeRawBufferPointer(zeros.prefix(n)), at: offset + done)
            done += UInt64(n)
        }
    }
}
