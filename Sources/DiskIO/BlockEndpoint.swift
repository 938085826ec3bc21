/// Something block I/O is addressed to: a local file or device today (`DiskFile`), an NBD
/// export later. The I/O engines and the convert pipeline address endpoints, not files, so
/// another kind of endpoint needs no change above DiskIO beyond opening it.
///
/// Reads and writes are positional and may come from several threads at once (the thread-pool
/// engine's workers), never for overlapping ranges being written.
public protocol BlockEndpoint: AnyObject, Sendable {
    /// The name messages give it (a file's path, an NBD URI).
    var name: String { get }
    /// Whether I/O must be aligned (O_DIRECT): buffers to `ioAlignment.memory`, offsets and
    /// lengths to `ioAlignment.offset`.
    var isDirect: Bool { get }
    /// The alignment direct I/O needs (see `isDirect`); buffered endpoints take any.
    var ioAlignment: (memory: Int, offset: Int) { get }
    /// The engine that moves data to and from it fastest (`IOEngines.make(for:)`).
    var preferredEngine: IOEngineKind { get }
    /// Its size in bytes.
    func size() throws -> UInt64
    /// Reads until `buffer` is full or the end; returns the bytes read.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
    /// Writes all of `buffer`.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes what was written durable (subject to the cache mode).
    func sync() throws
}

/// The engines `IOEngines.make(for:)` chooses between.
public enum IOEngineKind: Sendable {
    /// Linux native AIO: truly asynchronous only for O_DIRECT file descriptors.
    case linuxAIO
    /// A pool of threads doing synchronous reads and writes: any endpoint.
    case threadPool
}

/// An endpoint that is an open file description: Linux AIO can address its descriptor, and
/// only such an endpoint holds QEMU's image locks (byte-range locks on the file, ImageLock.swift).
public protocol FileEndpoint: BlockEndpoint {
    /// The descriptor; -1 once closed.
    var fd: Int32 { get }
    /// Takes QEMU's lock bytes for `lock` (see `DiskFile.lock`).
    func lock(_ lock: ImageLock) throws
    /// The first conflict `lock` would meet, or nil.
    func lockConflict(_ lock: ImageLock) throws -> ImageLockError?
    /// Releases every lock byte this description holds.
    func unlockImage() throws
}

extension DiskFile: FileEndpoint {
    public var name: String { path }
    public var ioAlignment: (memory: Int, offset: Int) { isDirect ? dioAlignment() : (1, 1) }
    /// Linux AIO only when the file is O_DIRECT: on a buffered file io_submit blocks.
    public var preferredEngine: IOEngineKind { isDirect ? .linuxAIO : .threadPool }
}
