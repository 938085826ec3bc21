import DiskIO
import ImageFormats

/// A made-up image for tests of what reads block status (the chain walker, convert's planner
/// and pipeline): block status from a list of extents (split at the range asked, as a real
/// image splits it), data from a closure, every question recorded. It calls itself qcow2 and
/// is never written.
public final class FakeImage: DiskImage {
    public let path: String
    public var format: ImageFormat { .qcow2 }
    public let virtualSize: UInt64
    public var isWritable: Bool { false }
    public var backing: (any DiskImage)?
    public let dataFile: DiskFile
    public var file: DiskFile { dataFile }
    public var extents: [Extent]
    let content: (UInt64) -> UInt8
    /// Every block-status question, in order.
    public private(set) var asked: [(offset: UInt64, length: UInt64)] = []
    public var blockStatusCalls: Int { asked.count }
    /// When set, block status answers with this length (to test bad answers).
    public var reportedLength: UInt64?

    public init(path: String, size: UInt64, dataFile: DiskFile, extents: [Extent], backing: (any DiskImage)? = nil,
                content: @escaping (UInt64) -> UInt8 = { _ in 0 }) {
        self.path = path
        virtualSize = size
        self.dataFile = dataFile
        self.extents = extents
        self.backing = backing
        self.content = content
    }

    /// An image whose extents are `kinds` laid end to end (`laidEndToEnd`); reads give zeros.
    public convenience init(_ path: String, size: UInt64, file: DiskFile, _ kinds: [(UInt64, Extent.Kind)],
                            backing: (any DiskImage)? = nil) {
        self.init(path: path, size: size, dataFile: file, extents: FakeImage.laidEndToEnd(kinds, size: size),
                  backing: backing)
    }

    /// Extents from (start, kind) pairs, each up to the next one's start (the last one up to
    /// `size`); starts are in units of `unit` bytes, `size` in bytes.
    public static func laidEndToEnd(_ kinds: [(UInt64, Extent.Kind)], size: UInt64, unit: UInt64 = 1) -> [Extent] {
        kinds.enumerated().map { index, item in
            let end = index + 1 < kinds.count ? kinds[index + 1].0 * unit : size
            return Extent(offset: item.0 * unit, length: end - item.0 * unit, kind: item.1)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        for i in 0..<buffer.count { buffer[i] = content(offset + UInt64(i)) }
    }
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {}
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {}
    public func discard(at offset: UInt64, length: UInt64) throws {}
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
        asked.append((offset, length))
        guard let extent = extents.first(where: { $0.offset <= offset && offset < $0.end }) else {
            throw ImageError(path: path, message: "no extent at \(offset)")
        }
        let delta = offset - extent.offset
        var kind = extent.kind
        if case .data(let host?) = kind { kind = .data(hostOffset: host + delta) }
        return Extent(offset: offset, length: reportedLength ?? min(extent.length - delta, length), kind: kind)
    }
    public func flush() throws {}
    public func close() throws {}
    public func info() throws -> ImageInfo { ImageInfo(filename: path, format: "qcow2", virtualSize: virtualSize) }
}
