import DiskIO
import Glibc

/// Creates raw images the way `qemu-img create -f raw` does.
public enum RawCreate {
    /// Creates (or truncates) `path` as a raw image of `size` bytes, rounded up to 512 as
    /// qemu-img does. `preallocation` is "off" (sparse; only the first block is written,
    /// as QEMU does so that O_DIRECT alignment can be probed), "falloc" (fallocate the whole
    /// file) or "full" (write zeros over the whole file). Validating option names is the
    /// caller's job; an unknown mode here is an ImageError.
    ///
    /// On a block or character device nothing is created or cut (see `createOnDevice`).
    /// `created` records the file for the caller's cleanup when it is a regular file.
    /// `cache`: the file's flushes (written through the page cache in any mode; unsafe never
    /// syncs, `DiskFile.ignoresFlushes`).
    public static func create(path: String, size: UInt64, preallocation: String = "off",
                              created: CreatedFiles? = nil, cache: CacheMode = .writeback) throws {
        let mode = preallocation.isEmpty ? "off" : preallocation
        // "metadata" reaches a device, which refuses it in QEMU's words for devices.
        guard ["off", "falloc", "full"].contains(mode) || (mode == "metadata" && FileKind(path: path)?.isDevice == true) else {
            throw ImageError(path: path, message: "Invalid preallocation mode: '\(preallocation)'")
        }
        let length = RawImage.sectorRoundUp(size)
        guard length <= UInt64(Int64.max) else {
            throw ImageError(path: path, message: "image size \(size) is too large")
        }
        let file: DiskFile
        do {
            file = try DiskFile.create(path, cache: cache.buffered)
        } catch {
            throw ImageError(path: path, message: "Could not create the image file", cause: error)
        }
        defer { file.close() }
        created?.record(file)
        if try file.kind().isDevice {
            try createOnDevice(file, size: size, preallocation: mode)
            return
        }
        guard mode != "metadata" else {
            throw ImageError(path: path, message: "Invalid preallocation mode: '\(preallocation)'")
        }
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
            // (A regular file: devices returned above, and truncate never cuts one anyway.)
            try? file.truncate(to: 0)
            throw ImageError(path: path, message: "Could not preallocate the image file", cause: error)
        }
    }

    /// A raw image "created" on a device, as QEMU's host_device driver does it
    /// (bdrv_co_create_opts_simple): no preallocation mode but off, a size above the device's
    /// is "Cannot grow device files", and the first sector is cleared. The device keeps its
    /// size and the rest of its contents; nothing is truncated.
    private static func createOnDevice(_ file: DiskFile, size: UInt64, preallocation mode: String) throws {
        guard mode == "off" else {
            throw ImageError(path: file.path, message: "Unsupported preallocation mode '\(mode)'")
        }
        do {
            let deviceSize = try file.size()
            guard size <= deviceSize else {
                throw ImageError(path: file.path, message: "\(DeviceSizeError(path: file.path, wanted: size, size: deviceSize))")
            }
            try file.zeroStart(512)
            try file.syncUnlessUnsyncable()
        } catch let error as IOError {
            throw ImageError(path: file.path, message: "Failed to clear the new image's first sector", cause: error)
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
