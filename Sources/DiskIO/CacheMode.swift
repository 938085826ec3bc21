/// A QEMU cache mode (`-t`/`-T`), the one table every command parses its cache options with.
/// QEMU's names, and `off` as QEMU's alias of `none` (bdrv_parse_cache_mode).
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
}
