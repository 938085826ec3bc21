import DiskIO

/// Where an image name points, after QEMU's name syntax is applied: the file (or device) to
/// open, through which protocol driver, and what a `json:` name adds.
public struct ImageLocation: Equatable, Sendable {
    /// QEMU's protocol drivers for local files.
    public enum Driver: String, Sendable {
        case file
        case hostDevice = "host_device"
        case hostCDROM = "host_cdrom"
    }

    /// The name as given: messages say "Could not open 'NAME': ...".
    public var name: String
    /// The file to open, its name as bytes (FileName).
    public var path: String
    /// The protocol driver the name asks for; nil lets the file decide, as QEMU's probe does
    /// (a block or character device opens as host_device, anything else as file).
    public var driver: Driver?
    /// A `json:` name's "driver" (a format name, as QEMU spells it).
    public var format: String?
    /// raw's "offset" and "size" (a window of the file), from a `json:` name.
    public var rawOffset: UInt64 = 0
    public var rawSize: UInt64?
    /// Which of raw's options the name gives (even as null): only a raw image may have them.
    public var rawOptions: [String] = []
    /// What QEMU calls the image once open (bs->filename, the "image:" line of info): the file
    /// name, or for a raw window a `json:` name regenerated as QEMU writes it.
    public var displayName: String

    public init(name: String, path: String, driver: Driver? = nil, displayName: String? = nil) {
        self.name = name
        self.path = path
        self.driver = driver
        self.displayName = displayName ?? path
    }
}

/// QEMU's syntax for image names (block.c: bdrv_fill_options, bdrv_find_protocol,
/// bdrv_make_absolute_filename), for the parts that name local files:
/// - `json:{...}` describes the image as block options (see `ImageName.parseJSON`);
/// - a name with a colon before any slash starts with a protocol: `file:NAME` is the file
///   NAME, `host_device:NAME` / `host_cdrom:NAME` the device NAME; a protocol QEMU does not
///   know is refused as qemu-img refuses it (`Unknown protocol 'c'`), one it knows but simg
///   has no driver for is refused by name; `./c:x` or `file:c:x` name a file `c:x`;
/// - a block or character device is opened by its name even with colons in it (udev's
///   by-path names have them), as QEMU's host_device probe does first;
/// - anything else is a file name.
public enum ImageName {
    /// Parses `name`. Errors are ImageErrors about `name` with qemu-img's words.
    public static func parse(_ name: String) throws -> ImageLocation {
        if name.hasPrefix("json:") { return try parseJSON(name) }
        guard let proto = protocolName(of: name) else { return ImageLocation(name: name, path: name) }
        if let status = FileStatus(name), status.isDevice { return ImageLocation(name: name, path: name) }
        let rest = String(name.dropFirst(proto.count + 1))
        if let driver = ImageLocation.Driver(rawValue: proto) {
            // QEMU shows a file name that itself looks like a protocol as "./NAME", so that
            // the name it shows opens the same file.
            let shown = protocolName(of: rest) != nil ? "./" + rest : rest
            return ImageLocation(name: name, path: rest, driver: driver, displayName: shown)
        }
        throw ImageError(path: name, message: unsupportedProtocol(proto))
    }

    /// The protocol prefix of `name` (before a colon that comes before any slash), or nil.
    /// QEMU's path_has_protocol; `json:` counts as one.
    public static func protocolName(of name: String) -> String? {
        for c in name.unicodeScalars {
            if c == "/" { return nil }
            if c == ":" { return String(name[..<name.firstIndex(of: ":")!]) }
        }
        return nil
    }

    /// The message for a protocol prefix simg cannot open: QEMU's own for one it does not know
    /// either (its buffer holds 127 bytes of the name), simg's for one QEMU knows.
    static func unsupportedProtocol(_ proto: String) -> String {
        if qemuProtocols.contains(proto) {
            return "simg does not support the '\(proto)' protocol"
        }
        let shown = FileName.decode(FileName.bytes(of: proto).prefix(127))
        return "Unknown protocol '\(shown)'"
    }

    /// The protocol names of QEMU 7.2's block drivers (with every module installed), besides
    /// the local ones simg supports (file, host_device, host_cdrom).
    static let qemuProtocols: Set<String> = [
        "nbd", "nbd+tcp", "nbd+unix", "http", "https", "ftp", "ftps", "iscsi", "iser", "gluster",
        "gluster+tcp", "gluster+unix", "gluster+rdma", "rbd", "ssh", "nfs", "fat", "null-co", "null-aio",
        "blkdebug", "blkverify", "nvme", "io_uring", "nvme-io_uring", "virtio-blk-vfio-pci",
        "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa",
    ]

    /// Whether qemu-img could open a backing file stored under `name` (its syntax, not the
    /// file): simg never writes a backing name QEMU would refuse as an unknown protocol or a
    /// json: name that simg cannot read (`create -u`, `rebase -u` would otherwise leave an
    /// image nothing opens). nil when it could; else the sentence saying why not.
    public static func backingNameProblem(_ name: String) -> String? {
        if name.hasPrefix("json:") {
            do {
                _ = try parseJSON(name)
                return nil
            } catch {
                let reason = (error as? ImageError)?.message ?? "\(error)"
                return "\(reason) in backing file name '\(name)'"
            }
        }
        guard let proto = protocolName(of: name), ImageLocation.Driver(rawValue: proto) == nil,
              !qemuProtocols.contains(proto) else { return nil }
        if let status = FileStatus(name), status.isDevice { return nil }
        return "\(unsupportedProtocol(proto)) in backing file name '\(name)': QEMU could not open it"
            + " (a file of that name is './\(name)' or 'file:\(name)')"
    }

    /// The name a backing file is opened by, as QEMU resolves it: names with a protocol
    /// (`file:x`, `json:{...}`) and absolute names as they are; a relative name against the
    /// folder of the file the image that names it lives in (`imageFile`, the opened file's
    /// own name, without any protocol prefix).
    public static func resolve(backing name: String, relativeTo imageFile: String) -> String {
        if name.hasPrefix("/") || protocolName(of: name) != nil { return name }
        guard let slash = imageFile.lastIndex(of: "/") else { return name }
        return String(imageFile[...slash]) + name
    }

    /// The file `name` names (without its protocol prefix), or `name` itself when it does not parse.
    public static func filePath(of name: String) -> String {
        (try? parse(name))?.path ?? name
    }

    /// The identity of the file `name` names (through its protocol prefix or json: name), or
    /// nil when it names none that can be reached.
    public static func identity(of name: String) -> FileIdentity? {
        guard let location = try? parse(name) else { return nil }
        return FileIdentity(path: location.path)
    }
}
