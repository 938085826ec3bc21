/// What `info` reports about one image: the same facts as qemu-img's ImageInfo, named as in
/// its JSON output. The CLI formats it as qemu-img's human text or JSON.
public struct ImageInfo: Sendable, Equatable {
    public var filename: String
    public var format: String
    public var virtualSize: UInt64
    /// Bytes allocated on disk ("disk size"), nil if unknown.
    public var actualSize: UInt64?
    public var clusterSize: Int?
    public var encrypted: Bool?
    public var dirtyFlag: Bool?
    /// The backing file name as stored in the image.
    public var backingFilename: String?
    /// The backing file name resolved against the image's folder.
    public var fullBackingFilename: String?
    public var backingFilenameFormat: String?
    public var snapshots: [SnapshotInfo]
    public var formatSpecific: QCOW2SpecificInfo?

    public init(filename: String, format: String, virtualSize: UInt64) {
        self.filename = filename
        self.format = format
        self.virtualSize = virtualSize
        self.snapshots = []
    }
}

/// One internal snapshot as `info` lists it.
public struct SnapshotInfo: Sendable, Equatable {
    public var id: String
    public var name: String
    public var vmStateSize: UInt64
    public var dateSeconds: UInt64
    public var dateNanoseconds: UInt64
    public var vmClockNanoseconds: UInt64
    /// The instruction count (qcow2 snapshot extra data), when stored.
    public var icount: UInt64?

    public init(id: String, name: String, vmStateSize: UInt64, dateSeconds: UInt64,
                dateNanoseconds: UInt64, vmClockNanoseconds: UInt64, icount: UInt64?) {
        self.id = id
        self.name = name
        self.vmStateSize = vmStateSize
        self.dateSeconds = dateSeconds
        self.dateNanoseconds = dateNanoseconds
        self.vmClockNanoseconds = vmClockNanoseconds
        self.icount = icount
    }
}

/// qemu-img's "Format specific information" for qcow2 (`format-specific.data` in JSON).
public struct QCOW2SpecificInfo: Sendable, Equatable {
    /// "0.10" or "1.1".
    public var compat: String
    /// "zlib" or "zstd"; nil for version 2 images (qemu-img prints it for v3 only? see CLI).
    public var compressionType: String?
    public var lazyRefcounts: Bool?
    public var refcountBits: Int
    public var corrupt: Bool?
    public var extendedL2: Bool?
    /// External data file name, and whether it is raw (data-file-raw).
    public var dataFile: String?
    public var dataFileRaw: Bool?
    /// Names of persistent dirty bitmaps (qemu-img shows their name, granularity and flags).
    public var bitmaps: [BitmapInfo]?

    public init(compat: String, refcountBits: Int) {
        self.compat = compat
        self.refcountBits = refcountBits
    }
}

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
