import DiskIO

// PLACEHOLDER (owned by the qcow2-write work): replaced by the real write path.
extension QCOW2Image {
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        throw ImageError(path: path, message: "writing qcow2 is not implemented yet")
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        throw ImageError(path: path, message: "writing qcow2 is not implemented yet")
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        throw ImageError(path: path, message: "writing qcow2 is not implemented yet")
    }

    public func flush() throws {}
}
