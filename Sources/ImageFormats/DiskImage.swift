import DiskIO
import Glibc

/// An image format, by QEMU's name, with the driver that reads, writes and creates it
/// (FormatDriver.swift). Only names of registered drivers make one.
public struct ImageFormat: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    let driver: any FormatDriver

    init(driver: any FormatDriver) {
        rawValue = driver.name
        self.driver = driver
    }

    /// The format of the registered driver named `rawValue`; nil for any other name.
    public init?(rawValue: String) {
        guard let driver = FormatRegistry.driver(named: rawValue) else { return nil }
        self.init(driver: driver)
    }

    public static let raw = ImageFormat(driver: RawDriver())
    public static let qcow2 = ImageFormat(driver: QCOW2Driver())

    /// Every registered format, in probing order.
    public static var allCases: [ImageFormat] { FormatRegistry.all.map(ImageFormat.init(driver:)) }

    public var capabilities: FormatCapabilities { driver.capabilities }
    public var description: String { rawValue }

    public static func == (a: ImageFormat, b: ImageFormat) -> Bool { a.rawValue == b.rawValue }
    public func hash(into hasher: inout Hasher) { hasher.combine(rawValue) }
}

/// The backing file an image names: the name as stored (relative names are relative to the
/// image's own file) and the format stored with it.
public struct BackingReference: Equatable, Sendable {
    public var name: String
    public var format: String?

    public init(name: String, format: String?) {
        self.name = name
        self.format = format
    }
}

extension DiskImage {
    /// Formats without backing files name none and are never given one.
    public var backingReference: BackingReference? { nil }
    public func attachBacking(_ image: any DiskImage) {}
    public func changeBackingFile(name: String?, format: String?) throws { throw BackingChangeError(code: ENOTSUP) }
    /// Formats of one file: just `file`.
    public var files: [DiskFile] { [file] }
    /// Formats that do not allocate: QEMU's default cluster size.
    public var clusterSize: Int { 65536 }
}

/// A backing file change the image cannot take; qemu-img's wording (it says "in the file
/// header" for ENOSPC here).
public struct BackingChangeError: Error, CustomStringConvertible {
    public var code: Int32

    public init(code: Int32) { self.code = code }

    public var description: String {
        code == ENOSPC ? "No space left in the file header" : IOError.describe(errno: code)
    }
}

/// What one range of an image's guest address space is, as a block-status query reports it.
/// The caller does the I/O: convert and rebase walk these to plan reads and skip zeros.
public struct Extent: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        /// Allocated data in this layer. `hostOffset` is where the range starts in
        /// `DiskImage.dataFile` (contiguous for the whole extent), nil if not directly readable.
        case data(hostOffset: UInt64?)
        /// Allocated compressed clusters in this layer: read them through `DiskImage.read`.
        /// `hostOffset ..< hostOffset + length` in `DiskImage.file` holds their compressed bytes:
        /// for one cluster exactly what its descriptor says (qcow2: the L2 entry's offset, up to
        /// the end of the last sector it counts), for several the clusters packed in guest order
        /// one after another as QEMU writes them (see `joiningCompressed`).
        case compressed(hostOffset: UInt64, length: Int)
        /// Reads as zeros, recorded in this layer (a qcow2 zero cluster; shadows any backing file).
        case zero
        /// Not allocated in this layer; reads come from the backing file.
        case backing
        /// Not allocated and there is no backing file (or it ends before here): reads as zeros.
        case hole
    }

    /// Guest offset of the first byte.
    public var offset: UInt64
    public var length: UInt64
    public var kind: Kind

    public init(offset: UInt64, length: UInt64, kind: Kind) {
        self.offset = offset
        self.length = length
        self.kind = kind
    }

    public var end: UInt64 { offset + length }

    /// True when the range reads as zeros without consulting another layer.
    public var readsAsZero: Bool { kind == .zero || kind == .hole }
}

extension Extent.Kind {
    /// Two compressed ranges, `next` guest-adjacent after this one, as one: when `next`'s
    /// bytes start inside this one's host range or right at its end (clusters packed in guest
    /// order), the range from this one's start to the later of both ends; nil otherwise (and for
    /// any other kinds), so a compressed extent's host range always holds all its clusters.
    public func joiningCompressed(_ next: Extent.Kind) -> Extent.Kind? {
        guard case .compressed(let host, let length) = self,
              case .compressed(let nextHost, let nextLength) = next else { return nil }
        let end = host + UInt64(length)
        guard nextHost >= host, nextHost <= end else { return nil }
        return .compressed(hostOffset: host, length: Int(max(end, nextHost + UInt64(nextLength)) - host))
    }
}

/// A disk image of some format, opened for reading or for reading and writing.
///
/// Offsets and lengths are guest bytes. Implementations are not thread-safe: one image is driven
/// by one thread (the convert pipeline does its parallel I/O on `dataFile` directly, using the
/// host offsets `blockStatus` returns).
public protocol DiskImage: AnyObject {
    /// The name the image was opened by.
    var path: String { get }
    var format: ImageFormat { get }
    /// Guest-visible size in bytes.
    var virtualSize: UInt64 { get }
    var isWritable: Bool { get }
    /// The opened backing image, if this image has one and it was opened.
    var backing: (any DiskImage)? { get }
    /// The backing file the image names, as stored, and its format if stored; nil for an
    /// image without one (and for formats that have none).
    var backingReference: BackingReference? { get }
    /// Gives the image its opened backing image. The chain opener calls it once, for an
    /// image with a `backingReference`, with the image that reference names.
    func attachBacking(_ image: any DiskImage)
    /// Stores a new backing file name and format (nil: none) in the image; everything written
    /// before is on disk first. Formats without backing files throw BackingChangeError(ENOTSUP).
    func changeBackingFile(name: String?, format: String?) throws
    /// The unit the image allocates guest space in (qcow2's cluster); rebase compares in it.
    var clusterSize: Int { get }
    /// The file the image itself is (its header and metadata), locked while the image is open.
    var file: DiskFile { get }
    /// The file guest data lives in (the image file itself, or a qcow2 external data file).
    var dataFile: DiskFile { get }
    /// Every file the image consists of, `file` first, each once (a qcow2 image: also its
    /// external data file): what is locked, and what "this image has that file open" means.
    var files: [DiskFile] { get }

    /// Fills `buffer` with guest data starting at `offset`; ranges past `virtualSize` are an error.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes the range read as zeros, allocating as little as possible.
    func writeZeroes(at offset: UInt64, length: UInt64) throws
    /// Drops the range's data where the format allows; it then reads as zeros or from backing.
    func discard(at offset: UInt64, length: UInt64) throws
    /// The extent starting exactly at `offset`, at most `length` long (shorter where the kind
    /// or, for `.data`, host contiguity changes). `length` must be > 0 and within the image.
    func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent
    /// Writes back cached metadata and syncs the files to stable storage.
    func flush() throws
    /// Flushes (if writable) and closes the image and its backing chain.
    func close() throws

    /// What `simg info` shows for this image alone (not its backing chain).
    func info() throws -> ImageInfo
}
