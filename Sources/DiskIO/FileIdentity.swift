import Glibc

/// Device and inode of a file: two names (or two open descriptions) of the same file compare
/// equal. Used to find backing-chain loops and to refuse writing over a file being read.
///
/// A block device is identified by the device it is (st_rdev), not by its node: two nodes of
/// one disk (/dev/loop0 and a node made with mknod elsewhere) are the same file to write on.
public struct FileIdentity: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64

    /// No file system has this device number; block devices use it with their st_rdev.
    private static let blockDeviceMarker = UInt64.max

    init(status: stat) {
        if FileKind(mode: status.st_mode) == .blockDevice {
            device = FileIdentity.blockDeviceMarker
            inode = UInt64(status.st_rdev)
        } else {
            device = UInt64(status.st_dev)
            inode = UInt64(status.st_ino)
        }
    }

    /// The identity of an open file.
    /// The corresponding C function is fstat.
    public init(of file: DiskFile) throws {
        var st = stat()
        // fstat only fills `st`; the fd stays owned by `file`.
        if fstat(file.fd, &st) != 0 {
            throw IOError(code: errno, operation: .stat, path: file.path)
        }
        self.init(status: st)
    }

    /// The identity of the file `path` names (its own bytes: see FileName), or nil if it
    /// cannot be reached.
    /// The corresponding C function is stat.
    public init?(path: String) {
        guard let status = FileStatus(path) else { return nil }
        self = status.identity
    }
}
