/// raw's answer to `qemu-img map`: every byte is allocated (present) at its own place in the
/// file, data where the file has data, zeros where it has a hole (also past its end, up to the
/// 512-byte-rounded virtual size), as QEMU's raw format over file-posix reports it.
extension RawImage: LayerStatusImage {
    /// The file's name as opened (without a `file:` prefix or `json:` wrapping).
    public var hostFileName: String { file.path }

    public func layerStatus(at offset: UInt64, length: UInt64) throws -> LayerStatus {
        let extent = try blockStatus(at: offset, length: length)
        let host = windowOffset + offset
        switch extent.kind {
        case .data:
            return LayerStatus(length: extent.length, present: true, zero: false, data: true, hostOffset: host)
        default:
            return LayerStatus(length: extent.length, present: true, zero: true, data: false, hostOffset: host)
        }
    }
}
