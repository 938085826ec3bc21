import DiskIO
import Glibc

/// A qcow2 image (or its external data file) created on a block or character device, as
/// qemu-img 7.2 does it through its host_device driver: nothing is created or truncated, the
/// device keeps its size, and only the metadata has to fit (the virtual size may exceed the
/// device; clusters are allocated from the refcounts, never at the device's end).
///
/// A device holds old data, unlike a new file: every metadata structure is written in full
/// (QCOW2Layout's refcount table and blocks are whole clusters; the L1 table's entries; L2
/// tables when preallocating), and the first cluster is cleared before anything else, so a
/// kill during creation leaves no old header behind that would point at half-written tables.
/// The device's other clusters keep their bytes; nothing references them (with metadata
/// preallocation the guest reads them, as with qemu-img, which does not zero a device either).
///
/// Where qemu-img writes part of the image before it meets an error (a device too small for
/// the metadata, a preallocation mode a device cannot do), simg checks first and writes
/// nothing; the messages are qemu-img's.
extension QCOW2Create {
    static func prepareDevice(_ file: DiskFile, _ p: QCOW2CreateParameters, layout: QCOW2Layout) throws {
        let cs = UInt64(layout.clusterSize)
        let kind = try io(p.path) { try file.kind() }
        if kind == .blockDevice {
            try checkFits(device: try io(p.path) { try file.size() }, p, layout: layout)
        }
        try io(p.path) {
            if kind == .characterDevice {
                try probeKeepsData(file, p, layout: layout)
            } else {
                try file.zeroStart(Int(cs))
            }
            try file.syncUnlessUnsyncable()
        }
        if kind == .characterDevice {
            try checkPreallocation(p, layout: layout)
        }
    }

    /// qemu-img's errors, in its order, for a block device of `size` bytes: it writes the header
    /// cluster, then the refcount table and first block (clusters 1 and 2), then grows the L1
    /// table, then preallocates (a device cannot) or truncates to the preallocated end.
    private static func checkFits(device size: UInt64, _ p: QCOW2CreateParameters, layout: QCOW2Layout) throws {
        let cs = UInt64(layout.clusterSize)
        func noSpace(_ what: String) -> ImageError {
            ImageError(path: p.path, message: "\(what): \(IOError.describe(errno: ENOSPC))")
        }
        if size < cs { throw noSpace("Could not write qcow2 header") }
        if size < 3 * cs || size < layout.refcountBlocksOffset + layout.refcountBlockCount * cs {
            throw noSpace("Could not write refcount table")
        }
        if layout.l1Entries > 0 && size < layout.l1Offset + layout.l1Entries * 8 {
            throw noSpace("Could not resize image: Failed to grow the L1 table")
        }
        try checkPreallocation(p, layout: layout)
        if size < layout.fileLength {
            throw ImageError(path: p.path, message: "Could not resize image",
                             cause: DeviceSizeError(path: p.path, wanted: layout.fileLength, size: size))
        }
    }

    /// falloc and full need a regular file below the image (the data clusters live in the image
    /// unless an external data file takes them).
    private static func checkPreallocation(_ p: QCOW2CreateParameters, layout: QCOW2Layout) throws {
        guard !layout.externalData, p.preallocation == .falloc || p.preallocation == .full else { return }
        throw ImageError(path: p.path, message: "Could not resize image: Failed to resize underlying file: Preallocation mode '\(p.preallocation.rawValue)' unsupported for this non-regular file")
    }

    /// A character device has no size to check; qemu-img writes the header and opens the image
    /// to find out whether it is one (on /dev/null it is not: "Image is not in qcow2 format").
    /// The same test here, before anything else is written: the magic is written, read back,
    /// and cleared again (so a kill still leaves no header before the metadata is complete).
    private static func probeKeepsData(_ file: DiskFile, _ p: QCOW2CreateParameters, layout: QCOW2Layout) throws {
        var magic = [UInt8](repeating: 0, count: 4)
        QCOW2BE.put32(&magic, 0, QCOW2Header.magic)
        try file.write(magic, at: 0)
        try checkReadsBack(file, path: p.path)
        try file.write([UInt8](repeating: 0, count: layout.clusterSize), at: 0)
    }

    /// After the header is written: a device that does not give it back holds no image.
    static func checkReadsBack(_ file: DiskFile, path: String) throws {
        let bytes = try io(path) { try file.readBytes(count: 4, at: 0) }
        guard QCOW2BE.u32(bytes, 0) == QCOW2Header.magic else {
            throw ImageError(path: path, message: "Image is not in qcow2 format")
        }
    }

    /// An external data file on a device: qemu-img refuses a virtual size above the device's
    /// (checked here before anything is written, where qemu-img has written the image first).
    static func checkDataDevice(_ data: DiskFile, _ p: QCOW2CreateParameters) throws {
        let size = try io(p.path) { try data.size() }
        guard p.size <= size else {
            throw ImageError(path: p.path, message: "Could not resize image",
                             cause: DeviceSizeError(path: data.path, wanted: p.size, size: size))
        }
    }

    /// After the image: qemu-img clears the data device's first sector; it preallocates
    /// nothing on it (the guest reads the device's old bytes where metadata preallocation maps
    /// them), and neither does simg.
    static func prepareDataDevice(_ data: DiskFile, _ p: QCOW2CreateParameters) throws {
        try io(data.path) {
            try data.zeroStart(512)
            try data.syncUnlessUnsyncable()
        }
    }
}
