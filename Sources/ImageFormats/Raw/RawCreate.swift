import DiskIO
import Glibc

/// Creates raw images the way `qemu-img create -f raw` does.
public enum RawCreate {
    /// Creates (or truncates) `path` as a raw image of `size` bytes, rounded up to 512 as
    /// qemu-img does. `preallocation` is "off" (sparse; only the first block is written,
    /// as QEMU does so that O_DIRECT alignment can be probed), "falloc" (fallocate the whole
    /// file) or "full" (write zeros over the whole file). Validating option names is the
    /// caller's job; an unknown mode here is an ImageError.
    public static func create(path: String, size: UInt64, preallocation: String = "off") throws {
        let mode = preallocation.isEmpty ? "off" : preallocation
        guard ["off", "falloc", "full"].contains(mode) else {
            throw ImageError(path: path, message: "Invalid preallocation mode: '\(preallocation)'")
        }
        let length = RawImage.sectorRoundUp(size)
        guard length <= UInt64(Int64.max) else {
            throw ImageError(path: path, message: "image size \(size) is too large")
        }
        let file: DiskFile
        do {
            file = try DiskFile.create(path)
        } catch {
            throw ImageError(path: path, message: "could not create the image file", cause: error)
        }
        defer { file.close() }
        do {
            switch mode {
            case "falloc":
                try ZeroBuffer.allocate(in: file, at: 0, length: length, image: path)
            case "full":
                try ZeroBuffer.write(to: file, at: 0, length: length, image: path)
            default:
                try file.truncate(to: length)
                if length > 0 { try writeFirstBlock(file, length: length) }
            }
            try file.sync()
        } catch let error as IOError {
            // Give the space back (the disk may be full), as qemu-img does: an empty file remains.
            try? file.truncate(to: 0)
            throw ImageError(path: path, message: "could not preallocate the image file", cause: error)
        }
    }

    /// QEMU writes one block of zeros at the start of a new sparse image (4 KiB, or 512 bytes
    /// if the image is smaller), so the file has an allocated block to probe alignment on.
    private static func writeFirstBlock(_ file: DiskFile, length: UInt64) throws {
        let count = length < 4096 ? 512 : 4096
        let zeros = try ZeroBuffer.get()
        try file.write(UnsafeRawBufferPointer(zeros.prefix(count)), at: 0)
    }

}
