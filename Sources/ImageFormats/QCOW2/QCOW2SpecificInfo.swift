/// qemu-img's "Format specific information" for qcow2 (QAPI's ImageInfoSpecificQCow2), typed;
/// `neutral` is the form `ImageInfo.formatSpecific` carries and `info` prints.
public struct QCOW2SpecificInfo: Sendable, Equatable {
    /// "0.10" or "1.1".
    public var compat: String
    /// "zlib" or "zstd"; nil means zlib (see `neutral`).
    public var compressionType: String?
    public var lazyRefcounts: Bool?
    public var refcountBits: Int
    public var corrupt: Bool?
    public var extendedL2: Bool?
    /// External data file name, and whether it is raw (data-file-raw).
    public var dataFile: String?
    public var dataFileRaw: Bool?
    /// Persistent dirty bitmaps (qemu-img shows their name, granularity and flags).
    public var bitmaps: [BitmapInfo]?

    public init(compat: String, refcountBits: Int) {
        self.compat = compat
        self.refcountBits = refcountBits
    }

    /// The members in QEMU's QAPI visit order (it decides the printed order of keys that share
    /// a hash bucket).
    public var neutral: FormatSpecificInfo {
        var data = InfoObject()
        data["compat"] = .string(compat)
        if let dataFile { data["data-file"] = .string(dataFile) }
        if let dataFileRaw { data["data-file-raw"] = .bool(dataFileRaw) }
        if let extendedL2 { data["extended-l2"] = .bool(extendedL2) }
        if let lazyRefcounts { data["lazy-refcounts"] = .bool(lazyRefcounts) }
        if let corrupt { data["corrupt"] = .bool(corrupt) }
        data["refcount-bits"] = .int(Int64(refcountBits))
        if let bitmaps, !bitmaps.isEmpty {
            data["bitmaps"] = .list(bitmaps.map { bitmap in
                .object(InfoObject([("name", .string(bitmap.name)),
                                    ("granularity", .uint(bitmap.granularity)),
                                    ("flags", .list(bitmap.flags.map { .string($0) }))]))
            })
        }
        // qemu-img 7.2 reports the compression type of every qcow2 image, version 2 included
        // (where it can only be zlib).
        data["compression-type"] = .string(compressionType ?? "zlib")
        return FormatSpecificInfo(type: "qcow2", data: data)
    }
}

/// One persistent dirty bitmap as `info` lists it.
public struct BitmapInfo: Sendable, Equatable {
    public var name: String
    public var granularity: UInt64
    /// "in-use", "auto"
    public var flags: [String]

    public init(name: String, granularity: UInt64, flags: [String]) {
        self.name = name
        self.granularity = granularity
        self.flags = flags
    }
}
