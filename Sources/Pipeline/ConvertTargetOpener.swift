import DiskIO
import ImageFormats

/// Opens the output of a convert as the fastest target its format has: raw and qcow2 their
/// own (copy-free async writes, parallel compression), any other format `ImageTarget`.
public enum ConvertTargetOpener {
    /// `startsZeroed`: created now or --target-is-zero (`assumeZero`). A lock conflict is an
    /// `ImageLockError`; other failures are the opener's ImageError/IOError.
    public static func open(_ path: String, format: ImageFormat, direct: Bool, startsZeroed: Bool,
                            assumeZero: Bool, compress: Bool, sparse: UInt64) throws -> any ConvertTarget {
        switch format {
        case .raw:
            let target = try RawTarget(path: path, direct: direct, startsZeroed: startsZeroed, assumeZero: assumeZero)
            // RawTarget opens the file itself (only reading its size so far): the writer's
            // lock is taken before anything is written, as for a qcow2 target.
            do {
                try target.image.file.lock(.writer)
            } catch {
                target.abandon()
                throw error
            }
            return target
        case .qcow2:
            let opened = try ImageOpener.open(path, options: OpenOptions(format: .qcow2, writable: true, direct: direct))
            guard let image = opened as? QCOW2Image else {
                try? opened.close()
                throw ImageError(path: path, message: "Image is not in qcow2 format")
            }
            if compress {
                // -S 0 compresses all-zero clusters too, as qemu-img does without sparse detection.
                return try QCOW2CompressedTarget(image: image, startsZeroed: startsZeroed,
                                                 compressZeroClusters: sparse == 0)
            }
            // Fresh chunks are written by the pipeline itself, straight from its buffers.
            return QCOW2AsyncTarget(image: image, startsZeroed: startsZeroed)
        default:
            // Any other format: through its image's own writes.
            let opened = try ImageOpener.open(path, options: OpenOptions(format: format, writable: true, direct: direct))
            return ImageTarget(image: opened, startsZeroed: startsZeroed, assumeZero: assumeZero)
        }
    }
}
