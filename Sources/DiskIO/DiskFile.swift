import CLinuxShims
import Glibc

/// An open file or block device, with the system calls simg needs wrapped so that every
/// failure is an `IOError` naming the file, the operation and the offset.
///
/// Reads and writes are positional (pread/pwrite), so one `DiskFile` may be shared by several
/// threads as long as they do not write overlapping ranges.
public final class DiskFile: @unchecked Sendable {
    // @unchecked Sendable: the mutable state is `fd`, which changes only in close() (callers
    // must not close a file other threads still use, as with any fd).

    public enum Access: Sendable { case readOnly, readWrite }

    public let path: String
    public let access: Access
    /// The cache mode the file was opened with: O_DIRECT (`isDirect`) and whether `sync`
    /// syncs (`ignoresFlushes`) follow from it.
    public let cache: CacheMode
    /// Opened with O_DIRECT (cache mode none or directsync): buffers, offsets and lengths
    /// must be aligned (see `dioAlignment`).
    public var isDirect: Bool { cache.direct }
    public private(set) var fd: Int32
    /// Cache mode unsafe (QEMU's cache.no-flush): `sync` does not call fdatasync. Everything
    /// that orders writes (waiting for one to complete before issuing the next) is unchanged,
    /// so what a kill leaves is the same; only durability against power loss is given up.
    public var ignoresFlushes: Bool { !cache.flushes }

    /// `dioAlignment()`, asked once at open (one statx) rather than on every aligned write.
    private let alignment: (memory: Int, offset: Int)

    private init(fd: Int32, path: String, access: Access, cache: CacheMode) {
        self.fd = fd
        self.path = path
        self.access = access
        self.cache = cache
        alignment = DiskFile.queryDIOAlignment(fd)
    }

    deinit {
        if fd >= 0 { _ = Glibc.close(fd) }
    }

    /// Opens an existing file; `cache` (by default writeback: buffered, synced on flush) says
    /// whether with O_DIRECT and whether `sync` syncs.
    /// The corresponding C function is open.
    public static func open(_ path: String, access: Access, cache: CacheMode = .writeback) throws -> DiskFile {
        let direct = cache.direct
        // O_CLOEXEC: a child process (a test runner's qemu-img, anything spawned) must not
        // inherit the descriptor, or it would keep the file's image locks alive after we close it.
        var flags = (access == .readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if direct { flags |= simg_o_direct() }
        let fd = FileName.withCString(path) { simg_open($0, flags, 0) }
        if fd < 0 {
            if -fd == EINVAL && direct {
                throw IOError(code: -fd, operation: .open, path: path,
                              detail: "the file system does not support O_DIRECT (cache mode none/directsync)")
            }
            throw IOError(code: -fd, operation: .open, path: path)
        }
        return DiskFile(fd: fd, path: path, access: access, cache: cache)
    }

    /// Creates a file for writing (mode 0644). With `exclusive`, fails if it already exists;
    /// otherwise an existing file is truncated to zero length (a device is opened as it is:
    /// `truncate` never cuts one).
    ///
    /// The file is locked with `lock` (QEMU's lock bytes, see ImageLock; by default those
    /// qemu-img create takes) BEFORE it is truncated: it is opened without O_TRUNC, locked,
    /// and only then cut to zero. So creating over an image another process (QEMU, qemu-nbd,
    /// or simg) has open fails with an `ImageLockError` and leaves the file as it was.
    /// The lock lasts as long as the returned file stays open.
    public static func create(_ path: String, exclusive: Bool = false, cache: CacheMode = .writeback,
                              lock: ImageLock? = .creator) throws -> DiskFile {
        var flags = O_RDWR | O_CREAT | O_CLOEXEC  // O_CLOEXEC: see open
        if exclusive { flags |= O_EXCL }
        if cache.direct { flags |= simg_o_direct() }
        let fd = FileName.withCString(path) { simg_open($0, flags, 0o644) }
        if fd < 0 { throw IOError(code: -fd, operation: .create, path: path) }
        let file = DiskFile(fd: fd, path: path, access: .readWrite, cache: cache)
        do {
            if let lock { try file.lock(lock) }
            if !exclusive { try file.truncate(to: 0) }
        } catch {
            file.close()
            throw error
        }
        return file
    }

    /// Opens an existing file and takes `lock` on it (see ImageLock); a conflict throws
    /// `ImageLockError` and leaves nothing open.
    public static func open(_ path: String, access: Access, cache: CacheMode = .writeback, lock: ImageLock) throws -> DiskFile {
        let file = try open(path, access: access, cache: cache)
        do {
            try file.lock(lock)
        } catch {
            file.close()
            throw error
        }
        return file
    }

    /// A second open file description of this very file, in cache mode `cache` (with or
    /// without O_DIRECT; `cache.buffered` for the same flushes without it). It is
    /// opened through /proc/self/fd/N, which leads to the open inode itself: a rename, or a
    /// new file under the old name since this one was opened, cannot redirect it (opening
    /// `path` again could). Messages still name `path`. Locks are not carried over: they belong
    /// to this description, which must stay open meanwhile. `access` defaults to this file's;
    /// a read-write reopen of a file opened read-only is checked by the kernel as an open.
    public func reopen(access newAccess: Access? = nil, cache: CacheMode) throws -> DiskFile {
        let access = newAccess ?? self.access
        var flags = (access == .readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC  // O_CLOEXEC: see open
        if cache.direct { flags |= simg_o_direct() }
        let reopened = simg_open("/proc/self/fd/\(fd)", flags, 0)
        if reopened < 0 { throw IOError(code: -reopened, operation: .reopen, path: path) }
        return DiskFile(fd: reopened, path: path, access: access, cache: cache)
    }

    /// Set by `lock`: this description holds QEMU lock bytes.
    var holdsImageLocks = false

    public func close() {
        // Locks belong to the open file description, which a child another thread is just
        // spawning shares until it execs: unlocked first, they go now, not when it execs.
        if fd >= 0 && holdsImageLocks { try? unlockImage() }
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }

    /// Reads until `buffer` is full or the end of the file; returns the bytes read.
    /// Short reads and EINTR are retried.
    /// The corresponding C function is pread.
    @discardableResult
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        try checkRange(offset, buffer.count, .read)
        var done = 0
        while done < buffer.count {
            // Sound: done < buffer.count, so the slice start is inside the buffer.
            let n = simg_pread(fd, buffer.baseAddress! + done, buffer.count - done, Int64(offset) + Int64(done))
            if n == -Int64(EINTR) { continue }
            if n < 0 { throw IOError(code: Int32(-n), operation: .read, path: path, offset: offset + UInt64(done)) }
            if n == 0 { break }
            done += Int(n)
        }
        return done
    }

    /// Reads exactly `buffer.count` bytes; reaching the end of the file first is an error.
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let n = try read(into: buffer, at: offset)
        if n < buffer.count {
            throw IOError(code: EIO, operation: .read, path: path, offset: offset + UInt64(n),
                          detail: "unexpected end of file (wanted \(buffer.count) bytes, got \(n))")
        }
    }

    /// Reads `count` bytes into a new array, zero-filling whatever lies past the end of file.
    /// For metadata (headers, tables), not for the data path.
    public func readBytes(count: Int, at offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { _ = try read(into: $0, at: offset) }
        return bytes
    }

    /// Writes the whole buffer, retrying short writes and EINTR.
    /// The corresponding C function is pwrite.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count, .write)
        var done = 0
        while done < buffer.count {
            // Sound: done < buffer.count, so the slice start is inside the buffer.
            let n = simg_pwrite(fd, buffer.baseAddress! + done, buffer.count - done, Int64(offset) + Int64(done))
            if n == -Int64(EINTR) { continue }
            if n < 0 { throw IOError(code: Int32(-n), operation: .write, path: path, offset: offset + UInt64(done)) }
            if n == 0 {
                throw IOError(code: EIO, operation: .write, path: path, offset: offset + UInt64(done),
                              detail: "write made no progress")
            }
            done += Int(n)
        }
    }

    /// Offsets come from image metadata: one past the largest file offset (2^63 - 1) must be an
    /// error naming the file, not a trap converting it to off_t.
    private func checkRange(_ offset: UInt64, _ count: Int, _ operation: IOError.Operation) throws {
        try checkRange(offset, length: UInt64(count), operation)
    }

    /// The same for every call taking an off_t offset and length (ftruncate, fallocate,
    /// lseek): `offset + length` must not pass 2^63 - 1, which `Int64(_:)` would trap on.
    private func checkRange(_ offset: UInt64, length: UInt64, _ operation: IOError.Operation) throws {
        let largest = UInt64(Int64.max)
        guard offset <= largest else {
            throw IOError(code: EINVAL, operation: operation, path: path, offset: offset,
                          detail: "offset is past the largest file offset")
        }
        guard length <= largest - offset else {
            throw IOError(code: EINVAL, operation: operation, path: path, offset: offset,
                          detail: "a range of \(length) bytes ends past the largest file offset")
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// The file's size in bytes (for a block device, the device size).
    public func size() throws -> UInt64 {
        try stat().size
    }

    /// Bytes actually allocated on disk (st_blocks * 512): qemu-img's "disk size".
    public func allocatedBytes() throws -> UInt64 {
        try stat().allocated
    }

    public func isBlockDevice() throws -> Bool {
        try stat().isBlockDevice
    }

    private func stat() throws -> (size: UInt64, allocated: UInt64, isBlockDevice: Bool) {
        var size: UInt64 = 0, allocated: UInt64 = 0
        var block: Int32 = 0
        let r = simg_file_size(fd, &size, &allocated, &block)
        if r < 0 { throw IOError(code: -r, operation: .stat, path: path) }
        return (size, allocated, block != 0)
    }

    /// The corresponding C function is ftruncate.
    /// On a block or character device nothing is cut or grown: a length up to the device's
    /// size is accepted as it is, a larger one throws `DeviceSizeError` (see FileKind.swift).
    public func truncate(to length: UInt64) throws {
        if try keepsDeviceSize(length) { return }
        try checkRange(length, length: 0, .truncate)
        let r = simg_ftruncate(fd, Int64(length))
        if r < 0 { throw IOError(code: -r, operation: .truncate, path: path, offset: length) }
    }

    /// Allocates blocks for the range (fallocate mode 0), growing the file if needed.
    public func allocate(at offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        try checkRange(offset, length: length, .allocate)
        let r = simg_fallocate_allocate(fd, Int64(offset), Int64(length))
        if r < 0 { throw IOError(code: -r, operation: .allocate, path: path, offset: offset) }
    }

    /// Deallocates the range; it then reads as zeros. The file size does not change.
    /// Throws with code EOPNOTSUPP where the file system cannot punch holes.
    public func punchHole(at offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        try checkRange(offset, length: length, .punchHole)
        let r = simg_fallocate_punch_hole(fd, Int64(offset), Int64(length))
        if r < 0 { throw IOError(code: -r, operation: .punchHole, path: path, offset: offset) }
    }

    /// Makes the range read as zeros, keeping it allocated (FALLOC_FL_ZERO_RANGE).
    public func zeroRange(at offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        try checkRange(offset, length: length, .zeroRange)
        let r = simg_fallocate_zero_range(fd, Int64(offset), Int64(length))
        if r < 0 { throw IOError(code: -r, operation: .zeroRange, path: path, offset: offset) }
    }

    /// The corresponding C function is fdatasync.
    ///
    /// Once SIGINT/SIGTERM is pending this throws `InterruptedError` instead of syncing: a sync
    /// of a large page cache can take seconds, and the process is about to stop. Nothing the
    /// caller meant to write after the sync is written, so the write ordering still holds; only
    /// durability against power loss of what is already written is not waited for.
    /// With `ignoresFlushes` it only checks for a pending signal.
    public func sync() throws {
        try Interruption.check()
        if ignoresFlushes { return }
        let r = simg_fdatasync(fd)
        if r < 0 { throw IOError(code: -r, operation: .sync, path: path) }
    }

    /// The start of the first data region at or after `offset`, or nil if there is none
    /// (only a hole up to the end of the file).
    /// The corresponding C function is lseek with SEEK_DATA.
    public func nextData(from offset: UInt64) throws -> UInt64? {
        try checkRange(offset, length: 0, .findData)
        let r = simg_seek_data(fd, Int64(offset))
        if r == -Int64(ENXIO) { return nil }
        if r < 0 { throw IOError(code: Int32(-r), operation: .findData, path: path, offset: offset) }
        return UInt64(r)
    }

    /// The start of the first hole at or after `offset` (the end of the file counts as a hole).
    /// The corresponding C function is lseek with SEEK_HOLE.
    public func nextHole(from offset: UInt64) throws -> UInt64 {
        try checkRange(offset, length: 0, .findHole)
        let r = simg_seek_hole(fd, Int64(offset))
        if r < 0 { throw IOError(code: Int32(-r), operation: .findHole, path: path, offset: offset) }
        return UInt64(r)
    }

    /// The alignment O_DIRECT needs for buffers and for offsets/lengths: statx's STATX_DIOALIGN
    /// where the kernel reports it, else 4096 for both (the page size, which also avoids the
    /// request splitting an only-512-aligned buffer causes). Memory alignment is never below
    /// the page size for the same reason.
    /// The file system's answer does not change while the file is open, so it is asked once.
    public func dioAlignment() -> (memory: Int, offset: Int) { alignment }

    private static func queryDIOAlignment(_ fd: Int32) -> (memory: Int, offset: Int) {
        var mem: UInt32 = 0, off: UInt32 = 0
        if simg_dio_alignment(fd, &mem, &off) == 0 {
            return (max(Int(mem), DiskFile.pageSize), max(Int(off), 512))
        }
        return (DiskFile.pageSize, 4096)
    }

    public static let pageSize: Int = {
        let size = sysconf(Int32(_SC_PAGESIZE))
        return size > 0 ? size : 4096
    }()
}
