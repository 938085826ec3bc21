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
        try QCOW2BitmapDirectory.load(file: file, header: header, virtualSize: virtualSize, path: path).map { entry in
            var names: [String] = []
            if entry.inUse { names.append("in-use") }
            if entry.isAuto { names.append("auto") }
            return BitmapInfo(name: entry.name, granularity: entry.granularity, flags: names)
        }
    }
}
