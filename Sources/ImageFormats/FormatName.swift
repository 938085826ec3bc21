/// A format named on the command line (`-f`, `-O`, `-F`, `backing_fmt`, a json: `driver`) that
/// simg cannot use. Unknown names get qemu-img's words for the context; names of QEMU drivers
/// simg does not have yet say so, in the words probing uses for such an image.
public struct FormatNameError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: Sendable {
        /// Not a QEMU driver; named to open an image with: "Unknown driver 'x'".
        case unknownDriver
        /// Not a QEMU driver; named to create an image in: "Unknown file format 'x'".
        case unknownFileFormat
        /// A QEMU image format simg does not have yet (vmdk, vpc, vdi, ...).
        case unsupportedFormat
        /// Another QEMU driver (a protocol or filter), which is not an image format to simg.
        case unsupportedDriver
    }

    public var name: String
    public var kind: Kind

    public var description: String {
        switch kind {
        case .unknownDriver: "Unknown driver '\(name)'"
        case .unknownFileFormat: "Unknown file format '\(name)'"
        case .unsupportedFormat: "the \(name) format is not supported yet"
        case .unsupportedDriver: "the '\(name)' driver is not supported by simg"
        }
    }

    /// Whether QEMU knows the name (so qemu-img would accept it where simg cannot).
    public var isQEMUDriver: Bool { kind == .unsupportedFormat || kind == .unsupportedDriver }
}

extension ImageFormat {
    /// The format `name` names. `creating` picks the words for a name QEMU does not know: a
    /// format to create in (-O, create -f) or a driver to open with (-f, -F).
    public init(named name: String, creating: Bool = false) throws(FormatNameError) {
        if let format = ImageFormat(rawValue: name) {
            self = format
            return
        }
        if Self.qemuImageFormats.contains(name) {
            throw FormatNameError(name: name, kind: .unsupportedFormat)
        }
        if Self.qemuDrivers.contains(name) {
            throw FormatNameError(name: name, kind: .unsupportedDriver)
        }
        throw FormatNameError(name: name, kind: creating ? .unknownFileFormat : .unknownDriver)
    }

    /// QEMU 7.2's image format drivers simg may one day read.
    static let qemuImageFormats: Set<String> = [
        "bochs", "cloop", "dmg", "luks", "parallels", "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
    ]

    /// QEMU 7.2's block driver names (BlockdevDriver): accepted as backing_fmt with -u.
    static let qemuDrivers: Set<String> = [
        "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
        "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
        "gluster", "host_cdrom", "host_device", "http", "https", "io_uring", "iscsi", "luks",
        "nbd", "nfs", "null-aio", "null-co", "nvme", "nvme-io_uring", "parallels", "preallocate",
        "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi",
        "vhdx", "virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk",
        "vpc", "vvfat",
    ]
}
