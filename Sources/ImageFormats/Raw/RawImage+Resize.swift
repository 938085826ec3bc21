import DiskIO
import Glibc

/// raw resize as QEMU's raw and file drivers do it (raw_co_truncate, raw_regular_truncate):
/// off = ftruncate, falloc = posix_fallocate of the new range, full = zeros written from the
/// old end, then fsync; metadata is not a raw mode. A device is never cut or grown.
extension RawImage: ResizableImage {
    public var warnsWhenProbedForWriting: Bool { true }

    /// What a SIGINT/SIGTERM during preallocation leaves (the file is the new size already
    /// or partly grown; raw has no metadata to be inconsistent).
    static let resizeOutcome = "was not completely preallocated"

    public func resize(to size: UInt64, preallocation: ResizePreallocation) throws {
        if !isWritable { throw ImageError(path: path, message: "the image is opened read-only") }
        let isDevice = try file.kind().isDevice
        if !isDevice && preallocation != .off && preallocation != .falloc && preallocation != .full {
            throw ResizeError("Unsupported preallocation mode: \(preallocation.rawValue)")
        }
        if isDevice {
            // QEMU's checks for a file that is not regular, in its order, before anything.
            if preallocation != .off {
                throw ResizeError("Preallocation mode '\(preallocation.rawValue)' unsupported for this non-regular file")
            }
            if size != (try file.size()) - windowOffset { throw ResizeError("Cannot resize device files") }
            return
        }
        let target = windowOffset + size
        let current = try file.size()
        do {
            switch preallocation {
            case .falloc where target > current:
                do {
                    try ZeroBuffer.allocate(in: file, at: current, length: target - current, image: path,
                                            outcome: RawImage.resizeOutcome)
                } catch let error as IOError {
                    throw ResizeError("Could not preallocate new data: \(error.reason)")
                }
            case .full where target > current:
                // QEMU truncates first (the file system learns the final size), then writes.
                try file.truncate(to: target)
                try ZeroBuffer.write(to: file, at: current, length: target - current, image: path,
                                     outcome: RawImage.resizeOutcome)
                try file.sync()
            default:
                break
            }
            try resize(to: size)
        } catch let error as IOError where error.operation == .truncate {
            throw ResizeError("Could not resize file: \(error.reason)")
        }
    }
}
