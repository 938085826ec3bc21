import CLinuxShims
import Glibc

/// Copying between two files without the bytes passing through simg: FICLONERANGE (the
/// target range shares the source's extents, as `cp --reflink` does; XFS with reflink=1,
/// btrfs) and copy_file_range(2) (the kernel copies, and clones where the file system can).
///
/// Both may be impossible for reasons that say nothing about the data (another file system,
/// a file system without extent sharing, a range not on its block grid, a block device): the
/// calls then answer `.unsupported` and the caller copies the usual way. Only other errors
/// (EIO, ENOSPC, ...) are thrown.
public enum CopyOffload {
    public enum Outcome: Equatable, Sendable {
        /// `count` bytes are in place (copy_file_range may stop short at the source's end).
        case done(UInt64)
        /// Not possible here; nothing useful was done.
        case unsupported
    }

    /// The errnos that mean "cannot offload/clone here" rather than a failure of the data.
    static func meansUnsupported(_ code: Int32) -> Bool {
        switch code {
        case EXDEV, EOPNOTSUPP, EINVAL, ENOSYS, ENOTTY, EBADF, ETXTBSY, EPERM, EISDIR: return true
        default: return false
        }
    }

    /// Makes [targetOffset, +length) of `target` share the extents of [sourceOffset, +length)
    /// of `source` (FICLONERANGE). Offsets and length must lie on the file system's block grid
    /// (`blockSize`), except a length ending at the source's end of file.
    public static func clone(from source: any FileEndpoint, at sourceOffset: UInt64, to target: any FileEndpoint,
                             at targetOffset: UInt64, length: UInt64) throws -> Outcome {
        guard let s = Int64(exactly: sourceOffset), let t = Int64(exactly: targetOffset) else { return .unsupported }
        let r = simg_clone_range(source.fd, s, length, target.fd, t)
        if r == 0 { return .done(length) }
        if meansUnsupported(-r) { return .unsupported }
        throw IOError(code: -r, operation: .cloneRange, path: target.name, offset: targetOffset)
    }

    /// Whether FICLONERANGE works from `source` into `target`, asked without touching either:
    /// a clone of length 0 from the source's end of file is a no-op success where the file
    /// system can share extents between the two files (the kernel answers EXDEV across file
    /// systems and EOPNOTSUPP where it cannot share, before looking at the range).
    public static func canClone(from source: any FileEndpoint, to target: any FileEndpoint) -> Bool {
        guard let size = try? source.size(), let end = Int64(exactly: size) else { return false }
        return simg_clone_range(source.fd, end, 0, target.fd, 0) == 0
    }

    /// copy_file_range from `source` to `target` until `length` bytes are copied or the
    /// source ends. `.unsupported` only when the first call refuses; a refusal after some
    /// bytes answers the count done so far (the caller copies the rest itself).
    public static func copy(from source: any FileEndpoint, at sourceOffset: UInt64, to target: any FileEndpoint,
                            at targetOffset: UInt64, length: UInt64) throws -> Outcome {
        var done: UInt64 = 0
        while done < length {
            guard let s = Int64(exactly: sourceOffset + done), let t = Int64(exactly: targetOffset + done) else { break }
            // At most 1 GiB per call: the kernel caps a call near 2 GiB anyway.
            let n = simg_copy_file_range(source.fd, s, target.fd, t, min(length - done, 1 << 30))
            if n == 0 { break }
            if n < 0 {
                if meansUnsupported(Int32(-n)) {
                    if done == 0 { return .unsupported }
                    break
                }
                throw IOError(code: Int32(-n), operation: .copyRange, path: target.name, offset: targetOffset + done)
            }
            done += UInt64(n)
        }
        return .done(done)
    }

    /// The file system block of `file` (the grid FICLONERANGE needs), or nil if unknown.
    public static func blockSize(of file: any FileEndpoint) -> UInt64? {
        let r = simg_fs_block_size(file.fd)
        return r > 0 ? UInt64(r) : nil
    }
}
