import Glibc

/// What a name refers to, from stat(2) or lstat(2), with the name's own bytes reaching the
/// kernel (see `FileName`). The one place simg looks at files by name rather than through a
/// descriptor.
public struct FileStatus: Sendable, Equatable {
    public var kind: FileKind
    public var identity: FileIdentity
    public var size: UInt64

    /// The status of the file `name` names, following symbolic links (`followLinks`, stat)
    /// or of the link itself (lstat); nil with the errno when the name cannot be reached.
    /// The corresponding C functions are stat and lstat.
    public static func of(_ name: String, followLinks: Bool = true) -> Result<FileStatus, IOError> {
        var st = stat()
        let r = FileName.withCString(name) { followLinks ? stat($0, &st) : lstat($0, &st) }
        if r != 0 { return .failure(IOError(code: errno, operation: .stat, path: name)) }
        return .success(FileStatus(st))
    }

    /// The status, or nil when the name cannot be reached (missing, no permission, ...).
    public init?(_ name: String, followLinks: Bool = true) {
        guard case .success(let status) = FileStatus.of(name, followLinks: followLinks) else { return nil }
        self = status
    }

    init(_ st: stat) {
        kind = FileKind(mode: st.st_mode)
        identity = FileIdentity(status: st)
        size = UInt64(max(st.st_size, 0))
    }

    /// A block or character device node.
    public var isDevice: Bool { kind.isDevice }
}
