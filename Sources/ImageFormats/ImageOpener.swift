import DiskIO
import Glibc

/// How to open an image.
public struct OpenOptions: Sendable {
    /// The format; nil probes the file.
    public var format: ImageFormat?
    public var writable: Bool
    /// O_DIRECT (cache mode none).
    public var direct: Bool
    /// Open the backing chain (read-only) too.
    public var openBacking: Bool

    public init(format: ImageFormat? = nil, writable: Bool = false, direct: Bool = false, openBacking: Bool = true) {
        self.format = format
        self.writable = writable
        self.direct = direct
        self.openBacking = openBacking
    }
}

/// Opens images by name: probes the format, opens raw or qcow2, and opens the backing chain.
public enum ImageOpener {
    /// Longest backing chain accepted (QEMU has no fixed limit; this only stops absurd chains).
    public static let maxChainDepth = 1000

    /// Opens `path` (read-only unless `options.writable`). With `openBacking`, each qcow2
    /// image's backing file is opened read-only: the format from the backing format extension,
    /// else probed; relative names against the folder of the image that names them. A chain
    /// that reaches the same file twice (same device and inode) is refused.
    public static func open(_ path: String, options: OpenOptions = OpenOptions()) throws -> any DiskImage {
        let top = try openOne(path, format: options.format, writable: options.writable, direct: options.direct)
        guard options.openBacking else { return top }
        do {
            try openChain(of: top, direct: options.direct)
        } catch {
            try? top.close()
            throw error
        }
        return top
    }

    /// Opens one image without its backing file.
    public static func openOne(_ path: String, format: ImageFormat?, writable: Bool, direct: Bool) throws -> any DiskImage {
        var chosen = format
        if chosen == nil {
            let probeFile = try DiskFile.open(path, access: .readOnly)
            defer { probeFile.close() }
            chosen = try ImageProbe.probe(path: path, file: probeFile)
        }
        switch chosen ?? .raw {
        case .qcow2: return try QCOW2Image.open(path: path, writable: writable, direct: direct)
        case .raw: return try RawImage.open(path: path, writable: writable, direct: direct)
        }
    }

    private static func openChain(of top: any DiskImage, direct: Bool) throws {
        var seen: [FileIdentity: String] = [:]
        seen[try FileIdentity(of: mainFile(of: top))] = top.path
        var current: QCOW2Image? = top as? QCOW2Image
        var depth = 0
        while let image = current, let name = image.qcow2Header.backingFileName {
            depth += 1
            guard depth <= maxChainDepth else {
                throw ImageError(path: top.path, message: "Backing file chain of '\(top.path)' is deeper than \(maxChainDepth) images")
            }
            let full = QCOW2Image.resolveBackingName(name, relativeTo: image.path)
            var format: ImageFormat?
            if let formatName = image.qcow2Header.backingFormat {
                guard let known = ImageFormat(rawValue: formatName) else {
                    throw nested(ImageError(path: image.path, message: "Could not open backing file '\(full)' of '\(image.path)': backing format '\(formatName)' is not supported"),
                                 from: top, to: image)
                }
                format = known
            }
            let backing: any DiskImage
            do {
                backing = try openOne(full, format: format, writable: false, direct: direct)
            } catch {
                throw nested(ImageError(path: image.path, message: "Could not open backing file '\(full)' of '\(image.path)'", cause: error),
                             from: top, to: image)
            }
            let identity: FileIdentity
            do {
                identity = try FileIdentity(of: mainFile(of: backing))
            } catch {
                try? backing.close()
                throw error
            }
            if seen[identity] != nil {
                try? backing.close()
                throw ImageError(path: top.path, message: "Backing file chain of '\(top.path)' loops back to '\(full)'")
            }
            seen[identity] = full
            image.backing = backing
            current = backing as? QCOW2Image
        }
    }

    /// Wraps the failure to open `image`'s backing file in one "Could not open backing file"
    /// error per level above it, as QEMU nests them: qemu-img prints the chain as
    /// "Could not open 'top': Could not open backing file: Could not open backing file: ...".
    /// Each level is an ImageError whose path is the image whose backing file failed and
    /// whose cause is the level below (the innermost cause is the real error).
    private static func nested(_ error: ImageError, from top: any DiskImage, to image: QCOW2Image) -> ImageError {
        // The images from the top down to (not including) `image`.
        var above: [QCOW2Image] = []
        var walk = top as? QCOW2Image
        while let w = walk, w !== image {
            above.append(w)
            walk = w.backing as? QCOW2Image
        }
        var result = error
        var below: any DiskImage = image
        for parent in above.reversed() {
            result = ImageError(path: parent.path, message: "Could not open backing file '\(below.path)' of '\(parent.path)'", cause: result)
            below = parent
        }
        return result
    }

    /// The file that identifies an image (its qcow2 file, or a raw image's data file).
    private static func mainFile(of image: any DiskImage) -> DiskFile {
        (image as? QCOW2Image)?.file ?? image.dataFile
    }
}
