import Glibc

/// What a name or an open file is. simg treats block and character devices apart from regular
/// files: a device is something simg did not create, so it is never truncated, never removed,
/// and never assumed to read as zeros (docs/SAFETY.md, "Devices and the never-delete rule").
public enum FileKind: Sendable, Equatable {
    case regular, blockDevice, characterDevice, directory, fifo, socket, symbolicLink, other

    public init(mode: mode_t) {
        switch mode & S_IFMT {
        case S_IFREG: self = .regular
        case S_IFBLK: self = .blockDevice
        case S_IFCHR: self = .characterDevice
        case S_IFDIR: self = .directory
        case S_IFIFO: self = .fifo
        case S_IFSOCK: self = .socket
        case S_IFLNK: self = .symbolicLink
        default: self = .other
        }
    }

    /// A block or character device: its size is the device's, and it holds data of its own.
    public var isDevice: Bool { self == .blockDevice || self == .characterDevice }

    /// The kind of file `path` leads to, following symbolic links as open(2) does (and as
    /// QEMU's stat() does when it picks its host_device driver); nil when it cannot be reached.
    /// The corresponding C function is stat.
    public init?(path: String) {
        guard let status = FileStatus(path) else { return nil }
        self = status.kind
    }
}

/// A device cannot be made larger: QEMU's host_device driver refuses with these words, and
/// qemu-img prints them as they are ("x: error while converting raw: Cannot grow device files").
public struct DeviceSizeError: Error, CustomStringConvertible, Equatable, Sendable {
    public var path: String
    /// The length asked for, and the device's size.
    public var wanted: UInt64
    public var size: UInt64

    public init(path: String, wanted: UInt64, size: UInt64) {
        self.path = path
        self.wanted = wanted
        self.size = size
    }

    public var description: String { "Cannot grow device files" }
}

extension DiskFile {
    /// What this open file is.
    /// The corresponding C function is fstat.
    public func kind() throws -> FileKind {
        var status = stat()
        // fstat only fills `status`; the descriptor stays ours.
        guard fstat(fd, &status) == 0 else { throw IOError(code: errno, operation: .stat, path: path) }
        return FileKind(mode: status.st_mode)
    }

    /// The device rule of `truncate`: a block or character device is never cut or grown.
    /// A length up to its size is accepted as it is (QEMU's non-exact truncate of a host
    /// device does nothing either), a larger one is a `DeviceSizeError`. Returns whether the
    /// file is a device, in which case ftruncate must not be called.
    func keepsDeviceSize(_ length: UInt64) throws -> Bool {
        guard try kind().isDevice else { return false }
        let size = try size()
        guard length <= size else { throw DeviceSizeError(path: path, wanted: length, size: size) }
        return true
    }

    /// `sync`, except that a character device that cannot be synced (fdatasync's EINVAL:
    /// /dev/null, a terminal) is left as it is: there is nothing on it to wait for.
    public func syncUnlessUnsyncable() throws {
        do {
            try sync()
        } catch let error as IOError where error.code == EINVAL && (try? kind()) == .characterDevice {}
    }

    /// Writes zeros over the first `count` bytes (at most the device's size): what QEMU does
    /// to a device it "creates" an image on (create_file_fallback_zero_first_sector clears the
    /// first sector), so no old header there is taken for a new image.
    public func zeroStart(_ count: Int) throws {
        let length = min(UInt64(count), try size())
        guard length > 0 else { return }
        let zeros = [UInt8](repeating: 0, count: Int(length))
        try write(zeros, at: 0)
    }
}
