import DiskIO
import Glibc

/// An image in a format simg recognises but cannot open (vmdk, vdi, vhdx, ...).
/// Its description is the whole message: "'x.vmdk' is a vmdk image; that format is not supported yet".
public struct UnsupportedFormatError: Error, CustomStringConvertible, Equatable, Sendable {
    public var path: String
    /// QEMU's name for the format ("vmdk", "vpc", "qcow", ...).
    public var format: String

    public init(path: String, format: String) {
        self.path = path
        self.format = format
    }

    public var description: String {
        "'\(path)' is a \(format) image; that format is not supported yet"
    }
}

/// Guesses an image's format from its contents, as qemu-img does when no format is given.
public enum ImageProbe {
    /// How much of the start of the file the magics are looked for in (QEMU's probe size).
    static let headerSize = 512

    /// The format of the open file at `path`: qcow2 if it has the qcow2 magic (whatever its
    /// version: the qcow2 opener refuses versions it does not know), raw if nothing is
    /// recognised. Formats simg knows but does not support throw `UnsupportedFormatError`.
    /// Read errors are thrown as IOError.
    public static func probe(path: String, file: DiskFile) throws -> ImageFormat {
        try probeWithHeader(path: path, file: file).format
    }

    /// `probe`, with the header it read (the first `headerSize` bytes, zero-padded; nil for an
    /// empty file), which the opener hands to the driver so it is not read twice.
    static func probeWithHeader(path: String, file: DiskFile) throws -> (format: ImageFormat, header: [UInt8]?) {
        let size = try file.size()
        if size == 0 { return (.raw, nil) }
        let header = try readBytes(file, at: 0, count: headerSize, fileSize: size)
        if let driver = FormatRegistry.probe(header: header) { return (ImageFormat(driver: driver), header) }
        if let name = recognise(header: header, path: path) {
            throw UnsupportedFormatError(path: path, format: name)
        }
        // A fixed-size VHD has its "conectix" footer only in the last 512 bytes.
        if size >= 1024 {
            let footer = try readBytes(file, at: size - 512, count: 512, fileSize: size)
            if matches(footer, at: 0, "conectix") {
                throw UnsupportedFormatError(path: path, format: "vpc")
            }
        }
        return (.raw, header)
    }

    /// The QEMU format name for a header (the first 512 bytes, zero-padded), or nil.
    static func recognise(header: [UInt8], path: String) -> String? {
        if matches(header, at: 0, "QFI\u{FB}") {
            // QEMU calls version 1 "qcow"; 2, 3 and anything newer are qcow2.
            return readBE32(header, at: 4) == 1 ? "qcow" : "qcow2"
        }
        if matches(header, at: 0, "KDMV") || matches(header, at: 0, "COWD") || isVMDKDescriptor(header) {
            return "vmdk"
        }
        if readLE32(header, at: 0x40) == 0xBEDA_107F { return "vdi" }
        if matches(header, at: 0, "vhdxfile") { return "vhdx" }
        if matches(header, at: 0, "conectix") { return "vpc" }
        if matches(header, at: 0, "QED\0") { return "qed" }
        // LUKS version 1, the one QEMU 7.2 opens (a LUKS2 header is not probed by QEMU).
        if matches(header, at: 0, "LUKS\u{BA}\u{BE}") && readBE16(header, at: 6) == 1 { return "luks" }
        if (matches(header, at: 0, "WithoutFreeSpace") || matches(header, at: 0, "WithouFreSpacExt"))
            && readLE32(header, at: 16) == 2 {
            return "parallels"
        }
        if matches(header, at: 0, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n") {
            return "cloop"
        }
        if isBochs(header) { return "bochs" }
        // QEMU recognises dmg by its file name only (the UDIF trailer is at the end).
        if path.utf8.count > 4 && path.hasSuffix(".dmg") { return "dmg" }
        return nil
    }

    /// A VMDK text descriptor: after comment lines and leading blanks, the first line is
    /// "version=1", "version=2" or "version=3" (the rule QEMU's vmdk probe applies).
    private static func isVMDKDescriptor(_ header: [UInt8]) -> Bool {
        var i = 0
        let n = header.count
        while i < n {
            if header[i] == UInt8(ascii: "#") {
                while i < n && header[i] != UInt8(ascii: "\n") { i += 1 }
                i += 1
                continue
            }
            if header[i] == UInt8(ascii: " ") {
                while i < n && header[i] == UInt8(ascii: " ") { i += 1 }
                continue
            }
            for version in ["1", "2", "3"] {
                if matches(header, at: i, "version=\(version)\n") || matches(header, at: i, "version=\(version)\r\n") {
                    return true
                }
            }
            return false
        }
        return false
    }

    /// Bochs growing redolog: NUL-terminated magic, type and subtype, version 1 or 2.
    private static func isBochs(_ header: [UInt8]) -> Bool {
        matches(header, at: 0, "Bochs Virtual HD Image\0") && matches(header, at: 32, "Redolog\0")
            && matches(header, at: 48, "Growing\0")
            && [0x0002_0000, 0x0001_0000].contains(readLE32(header, at: 64))
    }

    /// Compares raw bytes (each character of `text` is one byte, U+0000...U+00FF).
    static func matches(_ bytes: [UInt8], at offset: Int, _ text: String) -> Bool {
        var i = offset
        for scalar in text.unicodeScalars {
            guard i < bytes.count, scalar.value < 256, bytes[i] == UInt8(scalar.value) else { return false }
            i += 1
        }
        return true
    }

    private static func readBE16(_ b: [UInt8], at i: Int) -> UInt16 {
        guard i + 2 <= b.count else { return 0 }
        return UInt16(b[i]) << 8 | UInt16(b[i + 1])
    }

    private static func readBE32(_ b: [UInt8], at i: Int) -> UInt32 {
        guard i + 4 <= b.count else { return 0 }
        return UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }

    private static func readLE32(_ b: [UInt8], at i: Int) -> UInt32 {
        guard i + 4 <= b.count else { return 0 }
        return UInt32(b[i + 3]) << 24 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 1]) << 8 | UInt32(b[i])
    }

    /// Reads `count` bytes at `offset`, zero-padded past the end of the file; on an O_DIRECT
    /// file through DiskIO's bounce (`readUnaligned`).
    private static func readBytes(_ file: DiskFile, at offset: UInt64, count: Int, fileSize: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        _ = try bytes.withUnsafeMutableBytes { try file.readUnaligned(into: $0, at: offset) }
        return bytes
    }
}
