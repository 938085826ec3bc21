import DiskIO
import ImageFormats

/// A convert target over any writable `DiskImage`: data through `write`, zeros through
/// `writeZeroes`, nothing asynchronous. What a format without a target of its own (raw's and
/// qcow2's are faster) is written through.
public final class ImageTarget: ConvertTarget {
    public let image: any DiskImage
    public var path: String { image.path }
    public var virtualSize: UInt64 { image.virtualSize }
    /// Sectors: every format addresses its guest disk in them.
    public var writeGranularity: Int { 512 }
    public var isDirect: Bool { image.file.isDirect }
    public var writesAsynchronously: Bool { false }
    private let startsZeroed: Bool

    /// `startsZeroed`: a fresh image (or --target-is-zero); not believed over a backing file,
    /// nor for a fresh image whose data lives on a device (only `assumeZero`, the user's word).
    public init(image: any DiskImage, startsZeroed: Bool, assumeZero: Bool = false) {
        self.image = image
        // Guest data on a device holds what the device held: a fresh image there is not zeroed.
        let dataOnDevice = (try? image.dataFile.kind().isDevice) ?? true
        self.startsZeroed = assumeZero || (startsZeroed && !dataOnDevice)
    }

    public func readsAsZero(at offset: UInt64, length: UInt64) -> Bool { startsZeroed && image.backing == nil }

    public func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (file: DiskFile, offset: UInt64)? { nil }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try image.write(data, at: offset)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try image.writeZeroes(at: offset, length: length)
    }

    public func finish() throws {
        try image.flush()
        try image.close()
    }

    public func abandon() { try? image.close() }

    public var ignoresFlushes: Bool {
        get { image.file.ignoresFlushes }
        set {
            image.file.ignoresFlushes = newValue
            image.dataFile.ignoresFlushes = newValue
        }
    }
}
