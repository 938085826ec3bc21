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
    /// The format's own section ("Format specific information"), as neutral data.
    public var formatSpecific: FormatSpecificInfo?

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
