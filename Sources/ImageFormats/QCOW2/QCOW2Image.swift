import DiskIO

// PLACEHOLDER (owned by the qcow2-read work): replaced by the real image class.
public final class QCOW2Image: DiskImage {
    public let path: String
    public let file: DiskFile
    public let dataFile: DiskFile
    public let isWritable: Bool
    public var format: ImageFormat { .qcow2 }
    public var virtualSize: UInt64 { 0 }
    public var backing: (any DiskImage)? { nil }

    init(path: String, file: DiskFile, writable: Bool) {
        self.path = path
        self.file = file
        self.dataFile = file
        self.isWritable = writable
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        throw ImageError(path: path, message: "reading qcow2 is not implemented yet")
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
        throw ImageError(path: path, message: "reading qcow2 is not implemented yet")
    }

    public func close() throws { file.close() }

    public func info() throws -> ImageInfo {
        throw ImageError(path: path, message: "reading qcow2 is not implemented yet")
    }
}
