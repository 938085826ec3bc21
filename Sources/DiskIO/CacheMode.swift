/// A QEMU cache mode (`-t`/`-T`), the one table every command parses its cache options with,
/// and what every file, image and convert target is opened with (`DiskFile.cache`).
/// QEMU's names, and `off` as QEMU's alias of `none` (bdrv_parse_cache_mode).
///
/// What simg does with each: none and directsync open with O_DIRECT; unsafe never syncs
/// (`DiskFile.sync` skips fdatasync); every other mode syncs where the image flushes (the
/// metadata order points, the end of a command). writethrough and directsync are not
/// write-through here: QEMU flushes after every write in them (cache.writeback=off), simg
/// only at those points, as writeback and none do.
public enum CacheMode: String, Sendable, CaseIterable {
    case none, directsync, writeback, writethrough, unsafe

    /// Parses a command-line cache mode; nil for a name QEMU does not accept (the caller words
    /// the error, which differs between target and source options).
    public init?(name: String) {
        if name == "off" { self = .none; return }
        self.init(rawValue: name)
    }

    /// none and directsync bypass the page cache (O_DIRECT).
    public var direct: Bool { self == .none || self == .directsync }

    /// unsafe is QEMU's cache.no-flush: nothing is ever flushed to stable storage.
    public var flushes: Bool { self != .unsafe }

    /// The mode with the same flushes through the page cache (none → writeback, directsync →
    /// writethrough): for a file's buffered second descriptor, and for creating images.
    public var buffered: CacheMode {
        switch self {
        case .none: return .writeback
        case .directsync: return .writethrough
        case .writeback, .writethrough, .unsafe: return self
        }
    }
}
