import CLinuxShims
import DiskIO
import Glibc

/// A raw image: guest byte N is file byte N.
///
/// The virtual size is the file size rounded up to 512 bytes, as QEMU reports it; the part of
/// that last sector past the end of the file reads as zeros.
public final class RawImage: DiskImage {
    public let path: String
    public let file: DiskFile
    public var format: ImageFormat { .raw }
    public private(set) var virtualSize: UInt64
    public let isWritable: Bool
    public var backing: (any DiskImage)? { nil }
    public var dataFile: DiskFile { file }
    private var isClosed = false
    /// Bounce buffer for O_DIRECT requests the caller did not align; allocated on first use.
    private var bounce: AlignedBuffer?

    init(path: String, file: DiskFile, writable: Bool) throws {
        self.path = path
        self.file = file
        self.isWritable = writable
        self.virtualSize = RawImage.sectorRoundUp(try file.size())
    }

    /// Opens `path` as a raw image. Failure to open the file is an ImageError naming the file
    /// whose `cause` is the IOError ("Could not open 'x': No such file or directory").
    public static func open(path: String, writable: Bool, direct: Bool) throws -> RawImage {
        let file: DiskFile
        do {
            file = try DiskFile.open(path, access: writable ? .readWrite : .readOnly, direct: direct)
        } catch {
            throw ImageError(path: path, message: "could not open the image file", cause: error)
        }
        return try RawImage(path: path, file: file, writable: writable)
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
        if file.isDirect && !isAligned(buffer.baseAddress!, offset, buffer.count) {
            n = try bouncedRead(into: buffer, at: offset)
        } else {
            n = try file.read(into: buffer, at: offset)
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
        if file.isDirect && !isAligned(data.baseAddress!, offset, data.count) {
            try bouncedWrite(data, at: offset)
        } else {
            try file.write(data, at: offset)
        }
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
            try file.punchHole(at: offset, length: length)
            return
        } catch let error as IOError where RawImage.isUnsupported(error) || error.code == EINVAL {}
        do {
            try file.zeroRange(at: offset, length: length)
            return
        } catch let error as IOError where RawImage.isUnsupported(error) || error.code == EINVAL {}
        try writeZeroBuffers(at: offset, length: length)
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkWritable()
        try checkRange(offset, length, "discard")
        guard length > 0 else { return }
        do {
            try file.punchHole(at: offset, length: length)
        } catch let error as IOError where RawImage.isUnsupported(error) || error.code == EINVAL {
            // Discard is advisory: a file system without hole punching (or a block device
            // given an unaligned range) keeps the data.
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
        guard length > 0 else { throw ImageError(path: path, message: "block status of an empty range") }
        try checkRange(offset, length, "query")
        let end = offset + length
        let data: UInt64?
        do {
            data = try file.nextData(from: offset)
        } catch let error as IOError where error.code == EINVAL || RawImage.isUnsupported(error) {
            // No SEEK_DATA here (e.g. some block devices): everything counts as data.
            return Extent(offset: offset, length: length, kind: .data(hostOffset: offset))
        }
        guard let data, data < end else {
            return Extent(offset: offset, length: length, kind: .hole)
        }
        if data > offset {
            return Extent(offset: offset, length: data - offset, kind: .hole)
        }
        let hole = try file.nextHole(from: offset)
        // hole > offset here since offset is in data; guard against a racing truncate anyway.
        let stop = min(max(hole, offset + 1), end)
        return Extent(offset: offset, length: stop - offset, kind: .data(hostOffset: offset))
    }

    public func flush() throws {
        guard isWritable, !isClosed else { return }
        try file.sync()
    }

    public func close() throws {
        guard !isClosed else { return }
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
        try file.truncate(to: newSize)
        virtualSize = RawImage.sectorRoundUp(newSize)
    }

    public func info() throws -> ImageInfo {
        var info = ImageInfo(filename: path, format: "raw", virtualSize: virtualSize)
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

    private func isAligned(_ pointer: UnsafeRawPointer, _ offset: UInt64, _ count: Int) -> Bool {
        let dio = file.dioAlignment()
        return Int(bitPattern: pointer) % dio.memory == 0
            && offset % UInt64(dio.offset) == 0 && count % dio.offset == 0
    }

    private func bounceBuffer() throws -> (buffer: AlignedBuffer, unit: UInt64) {
        let dio = file.dioAlignment()
        let unit = UInt64(max(dio.memory, dio.offset))
        if let bounce { return (bounce, unit) }
        let made = try AlignedBuffer(byteCount: 1 << 20, alignment: Int(unit))
        bounce = made
        return (made, unit)
    }

    /// O_DIRECT read of an unaligned request: read whole aligned blocks into the bounce
    /// buffer and copy out the wanted part. Returns the bytes that came from the file.
    private func bouncedRead(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let (bounce, unit) = try bounceBuffer()
        var done = 0
        while done < buffer.count {
            let position = offset + UInt64(done)
            let start = position - position % unit
            let skip = Int(position - start)
            let want = min(buffer.count - done, bounce.count - skip)
            let span = Int((UInt64(skip + want) + unit - 1) / unit * unit)
            let got = try file.read(into: bounce.prefix(span), at: start)
            let useful = max(0, min(got - skip, want))
            // Sound: skip + useful <= got <= span <= bounce.count, done + useful <= buffer.count.
            if useful > 0 { memcpy(buffer.baseAddress! + done, bounce.baseAddress + skip, useful) }
            done += useful
            if useful < want { break }  // end of file
        }
        return done
    }

    /// O_DIRECT write of an unaligned request: read-modify-write whole aligned blocks.
    private func bouncedWrite(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let (bounce, unit) = try bounceBuffer()
        var done = 0
        while done < data.count {
            let position = offset + UInt64(done)
            let start = position - position % unit
            let skip = Int(position - start)
            let want = min(data.count - done, bounce.count - skip)
            let span = Int((UInt64(skip + want) + unit - 1) / unit * unit)
            let chunk = bounce.prefix(span)
            if skip != 0 || want != span {
                // Partial blocks at the edges keep their current contents (zeros past EOF).
                let got = try file.read(into: chunk, at: start)
                if got < span { memset(bounce.baseAddress + got, 0, span - got) }
            }
            // Sound: skip + want <= span <= bounce.count and done + want <= data.count.
            memcpy(bounce.baseAddress + skip, data.baseAddress! + done, want)
            try file.write(UnsafeRawBufferPointer(chunk), at: start)
            done += want
        }
    }

    private func writeZeroBuffers(at offset: UInt64, length: UInt64) throws {
        let zeros = try ZeroBuffer.get()
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(zeros.count), length - done))
            // Direct files get aligned pieces; an unaligned tail goes through the bounce path.
            try write(UnsafeRawBufferPointer(zeros.prefix(n)), at: offset + done)
            done += UInt64(n)
        }
    }
}
