import Glibc

/// Memory that could not be allocated (posix_memalign failed or the size overflowed).
public struct AllocationError: Error, CustomStringConvertible, Sendable {
    public var byteCount: Int
    public var alignment: Int
    public var code: Int32

    public init(byteCount: Int, alignment: Int, code: Int32) {
        self.byteCount = byteCount
        self.alignment = alignment
        self.code = code
    }

    public var description: String {
        "Could not allocate \(byteCount) bytes of memory aligned to \(alignment): "
            + IOError.describe(errno: code)
    }
}

/// A block of memory aligned for O_DIRECT I/O, freed when the object goes away.
///
/// The alignment is at least the page size (and at least what the file system asks for), and
/// the size is rounded up to a multiple of it, so the whole buffer can be used for direct I/O.
public final class AlignedBuffer: @unchecked Sendable {
    // @unchecked Sendable: the pointer and size never change after init; the bytes themselves
    // are the caller's to synchronise, as with any buffer handed to I/O.

    public let alignment: Int
    /// The usable size: the requested size rounded up to `alignment`.
    public let count: Int
    public let baseAddress: UnsafeMutableRawPointer

    /// Allocates at least `byteCount` bytes aligned to `alignment` (rounded up to a power of
    /// two no smaller than the page size). The memory is zero-filled.
    public init(byteCount: Int, alignment: Int = DiskFile.pageSize) throws {
        let align = AlignedBuffer.validAlignment(alignment)
        guard byteCount >= 0, let rounded = AlignedBuffer.roundUp(max(byteCount, 1), to: align) else {
            throw AllocationError(byteCount: byteCount, alignment: align, code: EOVERFLOW)
        }
        var memory: UnsafeMutableRawPointer?
        let r = posix_memalign(&memory, align, rounded)
        guard r == 0, let memory else {
            throw AllocationError(byteCount: rounded, alignment: align, code: r == 0 ? ENOMEM : r)
        }
        // Zero-filled so that a buffer never leaks stale heap contents into an image.
        memset(memory, 0, rounded)
        self.alignment = align
        self.count = rounded
        self.baseAddress = memory
    }

    /// A buffer suitable for direct I/O on `file`: aligned to its memory alignment and sized
    /// to a multiple of both its memory and offset alignment.
    public convenience init(byteCount: Int, for file: DiskFile) throws {
        let dio = file.dioAlignment()
        try self.init(byteCount: byteCount, alignment: max(dio.memory, dio.offset))
    }

    deinit {
        free(baseAddress)
    }

    /// The whole buffer. Valid while this object is alive.
    public var bytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: baseAddress, count: count)
    }

    /// The first `length` bytes (clamped to the buffer).
    public func prefix(_ length: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: baseAddress, count: min(max(length, 0), count))
    }

    /// A power of two, at least the page size.
    static func validAlignment(_ requested: Int) -> Int {
        var align = DiskFile.pageSize
        while align < requested && align < (1 << 30) { align <<= 1 }
        return align
    }

    /// `value` rounded up to a multiple of `alignment` (a power of two), nil on overflow.
    static func roundUp(_ value: Int, to alignment: Int) -> Int? {
        let (sum, overflow) = value.addingReportingOverflow(alignment - 1)
        if overflow { return nil }
        return sum & ~(alignment - 1)
    }
}
