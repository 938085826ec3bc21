import DiskIO
import ImageFormats

/// Opens the output of a convert: the image through `ImageOpener` (its format's driver, the
/// writer's lock taken before anything is written), as a `CompressedTarget` for `-c`, else
/// as an `ImageTarget`, which uses whatever write capabilities the image has.
public enum ConvertTargetOpener {
    /// `startsZeroed`: created now or --target-is-zero (`assumeZero`). A lock conflict is an
    /// ImageError of kind `.lockConflict`; other failures are the opener's ImageError/IOError.
    /// `compress` only for a format with `.compressedWrites` (the caller checks). `cache`: the
    /// target's cache mode (`-t`), for every file of the image (unsafe, convert's default and
    /// QEMU's cache.no-flush: nothing is ever synced, also not between metadata writes; write
    /// order, which is what survives a kill, stays as it is).
    public static func open(_ path: String, format: ImageFormat, cache: CacheMode, startsZeroed: Bool,
                            assumeZero: Bool, compress: Bool, sparse: UInt64) throws -> any ConvertTarget {
        let opened = try ImageOpener.open(path, options: OpenOptions(format: format, writable: true, cache: cache))
        guard compress else {
            // Fresh chunks are written by the pipeline itself where the image lets it.
            return ImageTarget(image: opened, startsZeroed: startsZeroed, assumeZero: assumeZero)
        }
        guard let image = opened as? any CompressedClusterWrites else {
            try? opened.close()
            throw ImageError(path: path, message: "Compression is not supported for this image")
        }
        do {
            // -S 0 compresses all-zero clusters too, as qemu-img does without sparse detection.
            return try CompressedTarget(image: image, startsZeroed: startsZeroed, assumeZero: assumeZero,
                                        compressZeroClusters: sparse == 0)
        } catch {
            try? image.close()
            throw error
        }
    }
}
