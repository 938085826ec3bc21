import Glibc

/// Device and inode of a file: two names (or two open descriptions) of the same file compare
/// equal. Used to find backing-chain loops and to refuse writing over a file being read.
public struct FileIdentity: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64

    /// The identity of an open file.
    /// The corresponding C function is fstat.
    public init(of file: DiskFile) throws {
        var st = stat()
        // fstat only fills `st`; the fd stays owned by `file`.
        if fstat(file.fd, &st) != 0 {
            throw IOError(code: errno, operation: "stat", path: file.path)
        }
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
    }

    /// The identity of the file `path` names (its own bytes: see FileName), or nil if it
    /// cannot be reached.
    /// The corresponding C function is stat.
    public init?(path: String) {
        guard let status = FileStatus(path) else { return nil }
        self = status.identity
    }

    public init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }
}
