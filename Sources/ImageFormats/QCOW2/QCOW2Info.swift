import DiskIO

extension QCOW2Image {
    /// What qemu-img 7.2 `info` reports for this image alone.
    public func info() throws -> ImageInfo {
        var info = ImageInfo(filename: displayName, format: "qcow2", virtualSize: virtualSize)
        // qemu-img 7.2 counts the qcow2 file only, not an external data file.
        info.actualSize = try file.allocatedBytes()
        info.clusterSize = clusterSize
        info.dirtyFlag = header.isDirty
        if let name = header.backingFileName {
            info.backingFilename = name
            info.fullBackingFilename = ImageName.resolve(backing: name, relativeTo: file.path)
            info.backingFilenameFormat = header.backingFormat
        }
        info.snapshots = snapshots.map(\.info)

        var specific = QCOW2SpecificInfo(compat: header.version >= 3 ? "1.1" : "0.10",
                                         refcountBits: header.refcountBits)
        specific.compressionType = compression.name
        if header.version >= 3 {
            specific.lazyRefcounts = header.hasLazyRefcounts
            specific.corrupt = header.isCorrupt
            specific.extendedL2 = header.hasExtendedL2
            if header.hasDataFile {
                specific.dataFile = header.dataFileName
                specific.dataFileRaw = header.isDataFileRaw
            }
            let bitmaps = try readBitmapDirectory()
            if !bitmaps.isEmpty { specific.bitmaps = bitmaps }
        }
        info.formatSpecific = specific.neutral
        return info
    }

    /// Names, granularities and flags of the persistent dirty bitmaps, read from the bitmaps
    /// extension's directory when the extension is marked consistent (autoclear bit 0), as
    /// QEMU does; otherwise none.
    func readBitmapDirectory() throws -> [BitmapInfo] {
        guard let ext = header.bitmapsExtension, ext.count == 24,
              header.autoclearFeatures & QCOW2Header.autoclearBitmaps != 0 else { return [] }
        let count = Int(QCOW2BE.u32(ext, 0))
        let size = QCOW2BE.u64(ext, 8)
        let offset = QCOW2BE.u64(ext, 16)
        let fileSize = try file.size()
        // QEMU's limits: 65535 bitmaps, directory of at most 64 MiB.
        guard count <= 65535, size <= 64 << 20, offset % UInt64(clusterSize) == 0,
              offset.addingReportingOverflow(size).overflow == false, offset + size <= fileSize else {
            throw ImageError(path: path, message: "Invalid bitmaps extension (directory at \(QCOW2BE.hex(offset)), \(size) bytes, \(count) bitmaps)")
        }
        let dir = try file.qcow2ReadBytes(count: Int(size), at: offset)
        var result: [BitmapInfo] = []
        var p = 0
        for _ in 0..<count {
            guard p + 24 <= dir.count else {
                throw ImageError(path: path, message: "Invalid bitmap directory: entry runs past its end")
            }
            let flags = QCOW2BE.u32(dir, p + 12)
            let granularityBits = dir[p + 17]
            let nameSize = Int(QCOW2BE.u16(dir, p + 18))
            let extraSize = Int(QCOW2BE.u32(dir, p + 20))
            let nameStart = p + 24 + extraSize
            guard extraSize <= dir.count, nameStart + nameSize <= dir.count, granularityBits < 64 else {
                throw ImageError(path: path, message: "Invalid bitmap directory: entry runs past its end")
            }
            var names: [String] = []
            if flags & 1 != 0 { names.append("in-use") }
            if flags & 2 != 0 { names.append("auto") }
            result.append(BitmapInfo(name: QCOW2BE.string(dir[nameStart..<(nameStart + nameSize)]),
                                     granularity: 1 << UInt64(granularityBits), flags: names))
            p = (nameStart + nameSize + 7) & ~7
        }
        return result
    }
}
