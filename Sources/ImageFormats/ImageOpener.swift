import DiskIO
import Glibc

/// How to open an image.
public struct OpenOptions: Sendable {
    /// The format; nil probes the file.
    public var format: ImageFormat?
    public var writable: Bool
    /// The cache mode every file of the image and its chain is opened with (O_DIRECT for
    /// none and directsync; unsafe never syncs).
    public var cache: CacheMode
    /// Open the backing chain (read-only) too.
    public var openBacking: Bool
    /// Which of QEMU's image locks to take (see `ImageLocking`).
    public var locking: ImageLocking

    public init(format: ImageFormat? = nil, writable: Bool = false, cache: CacheMode = .writeback, openBacking: Bool = true,
                locking: ImageLocking = .standard) {
        self.format = format
        self.writable = writable
        self.cache = cache
        self.openBacking = openBacking
        self.locking = locking
    }
}

/// Which of QEMU's advisory image locks (DiskIO's ImageLock) an open takes, so that simg and
/// QEMU, qemu-nbd, qemu-io or qemu-img refuse each other's writes as qemu-img does.
public enum ImageLocking: Sendable {
    /// What qemu-img takes: a writable image the writer's lock, a read-only one the reader's;
    /// backing files always the reader's; an external data file the data file's.
    case standard
    /// qemu-img -U (force share): every file only holds "consistent read" and shares all, so
    /// a running VM's image can still be inspected. Refused for a writable open, as in QEMU.
    case forceShare
    /// The writer's locks on an image opened read-only: for `check -r`, which repairs the
    /// file through a descriptor of its own while this open image keeps the locks.
    case writer
    /// No locks at all: for looking at a file this process already has open (a second
    /// description of it would otherwise conflict with our own locks), and for info -U.
    case none
    /// What qemu-img info takes: a qcow2 image (each one of the chain) refuses writers and
    /// resizers but holds nothing (its metadata must not change under it); a raw image takes
    /// no lock at all, so a running VM's raw disk can always be inspected.
    case inspect

    /// The lock of the top image's file (`image` is already open, read-only unless `writable`).
    func top(_ image: any DiskImage, writable: Bool) -> ImageLock? {
        switch self {
        case .standard: return writable ? .writer : .reader
        case .forceShare: return .forceShare
        case .writer: return .writer
        case .none: return nil
        // qemu-img check takes the inspector's lock on an image it can check; on one it
        // cannot (raw) it stops before taking any.
        case .inspect: return image.format.capabilities.contains(.check) ? .inspector : nil
        }
    }

    /// The lock of the top image's external data file.
    func dataFile(writable: Bool) -> ImageLock? {
        switch self {
        case .standard: return writable ? .dataFileWriter : .reader
        case .forceShare: return .forceShare
        case .writer: return .dataFileWriter
        case .none, .inspect: return nil
        }
    }

    /// The lock of each backing file (always read-only). qemu-img -U shares them too.
    var backing: ImageLocking {
        switch self {
        case .standard, .writer: return .standard
        case .forceShare: return .forceShare
        case .none: return .none
        case .inspect: return .inspect
        }
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
    ///
    /// Every file is locked as `options.locking` says (QEMU's lock bytes: see ImageLocking);
    /// a conflict is an ImageError whose message is qemu's ("Failed to get \"write\" lock"
    /// and the "Is another process using the image [x]?" hint), naming the file that is in use.
    public static func open(_ path: String, options: OpenOptions = OpenOptions()) throws -> any DiskImage {
        if options.writable && options.locking == .forceShare {
            throw ImageError(path: path, message: "force-share=on can only be used with read-only images")
        }
        let top = try openOne(path, format: options.format, writable: options.writable, cache: options.cache)
        do {
            try lock(top, options.locking, writable: options.writable)
        } catch {
            try? top.close()
            throw error
        }
        guard options.openBacking else { return top }
        do {
            try openChain(of: top, cache: options.cache, locking: options.locking.backing)
        } catch {
            try? top.close()
            throw error
        }
        return top
    }

    /// Opens one image without its backing file. `path` is a name in QEMU's syntax
    /// (ImageName: `file:`, `json:{...}`, devices); `format` (-f) wins over a json: driver.
    public static func openOne(_ path: String, format: ImageFormat?, writable: Bool, cache: CacheMode) throws -> any DiskImage {
        let location = try ImageName.parse(path)
        try checkProtocolDriver(location)
        let given = format ?? location.format.flatMap(ImageFormat.init(rawValue:))
        // One open: the file is probed from the descriptor the driver then gets, header and all.
        let image: any DiskImage
        let driver: any FormatDriver
        if let file = try? DiskFile.open(location.path, access: writable ? .readWrite : .readOnly, cache: cache) {
            do {
                var header: [UInt8]?
                if let given {
                    driver = given.driver
                } else {
                    let probed = try ImageProbe.probeWithHeader(path: location.path, file: file)
                    driver = probed.format.driver
                    header = probed.header
                }
                image = try driver.open(file: file, location: location, header: header, writable: writable)
            } catch {
                file.close()
                throw error
            }
        } else {
            // The open failed: fail as the probe's read-only open, or the driver's own, words it.
            var chosen = given
            if chosen == nil {
                let probeFile: DiskFile
                do {
                    probeFile = try DiskFile.open(location.path, access: .readOnly)
                } catch {
                    throw ImageError(path: path, message: "could not open the image file", cause: error)
                }
                defer { probeFile.close() }
                chosen = try ImageProbe.probe(path: location.path, file: probeFile)
            }
            driver = (chosen ?? .raw).driver
            image = try driver.open(location: location, writable: writable, cache: cache)
        }
        // As in QEMU, options the format does not take are refused once it has opened (a
        // file that is not of the format says that first).
        if !driver.capabilities.contains(.windows), let option = location.rawOptions.first {
            try? image.close()
            throw ImageError(path: path, message: "Block format '\(driver.name)' does not support the option '\(option)'")
        }
        return image
    }

    /// What QEMU's protocol drivers require of the file, checked before it is opened: the file
    /// driver a regular file (QEMU's file-posix also opens devices under it, which
    /// host_device does), host_device and host_cdrom a device. A name without a protocol
    /// opens a device through host_device and anything else through file, so a directory is
    /// refused by file; a FIFO too (open(2) of one blocks until a writer comes: qemu-img
    /// hangs on an image or backing file that is one).
    public static func checkProtocolDriver(_ location: ImageLocation) throws {
        // An empty name is refused by QEMU's protocol driver before any open(2).
        if location.path.isEmpty {
            let driver = location.driver?.rawValue ?? "file"
            throw ImageError(path: location.name, message: "The '\(driver)' block driver requires a file name")
        }
        guard let status = FileStatus(location.path) else { return }  // open(2) says why
        let fileRefusal = "'file' driver requires '\(location.path)' to be a regular file"
        switch location.driver {
        case .hostDevice?, .hostCDROM?:
            if !status.isDevice {
                throw ImageError(path: location.name,
                                 message: "'\(location.driver!.rawValue)' driver requires '\(location.path)' to be either a character or block device")
            }
        case .file?:
            if status.kind != .regular { throw ImageError(path: location.name, message: fileRefusal) }
        case nil:
            if status.kind == .directory || status.kind == .fifo {
                throw ImageError(path: location.name, message: fileRefusal)
            }
        }
    }

    /// Takes the locks of one opened image: its file, and its other files (`files`: a qcow2
    /// image's external data file).
    ///
    /// The locks are taken once the image is open (its header read) rather than before: the
    /// open itself only reads, exactly as QEMU's probe reads the header before it locks, and
    /// nothing is ever written before the lock is held. A conflict is an ImageError of kind
    /// `.lockConflict` about `image.path` whose message is qemu's lock error text (the hint
    /// names the file in use); fcntl failing itself is not a conflict.
    static func lock(_ image: any DiskImage, _ locking: ImageLocking, writable: Bool) throws {
        let main = mainFile(of: image)
        do {
            if let lock = locking.top(image, writable: writable) { try main.lock(lock) }
            // The image's other files (a qcow2 external data file) are locked as data files.
            if let lock = locking.dataFile(writable: writable) {
                for other in image.files where other !== main { try other.lock(lock) }
            }
        } catch let error as ImageLockError {
            throw ImageError(.lockConflict, path: image.path, message: error.description)
        } catch let error as IOError where error.operation == .lock {
            // fcntl itself failed (a file system without OFD locks): qemu's
            // "Failed to lock byte 100: strerror", under the image's name.
            throw ImageError(path: image.path, message: error.reason)
        }
    }

    /// Whether an error `open` threw is a lock conflict (at any level of the backing chain),
    /// as opposed to a file that is missing or broken.
    public static func failedOnLock(_ error: any Error) -> Bool {
        var current: (any Error)? = error
        while let image = current as? ImageError {
            if image.kind == .lockConflict { return true }
            current = image.cause
        }
        return false
    }

    private static func openChain(of top: any DiskImage, cache: CacheMode, locking: ImageLocking) throws {
        var seen: [FileIdentity: String] = [:]
        seen[try FileIdentity(of: mainFile(of: top))] = top.path
        var current: (any DiskImage)? = top
        var depth = 0
        while let image = current, let reference = image.backingReference {
            let name = reference.name
            depth += 1
            guard depth <= maxChainDepth else {
                throw ImageError(path: top.path, message: "Backing file chain of '\(top.path)' is deeper than \(maxChainDepth) images")
            }
            let full = ImageName.resolve(backing: name, relativeTo: image.file.path)
            var format: ImageFormat?
            if let formatName = reference.format {
                guard let known = ImageFormat(rawValue: formatName) else {
                    throw nested(ImageError(.backingFileOpen, path: image.path, message: "Could not open backing file '\(full)' of '\(image.path)': backing format '\(formatName)' is not supported"),
                                 from: top, to: image)
                }
                format = known
            }
            let backing: any DiskImage
            do {
                backing = try openOne(full, format: format, writable: false, cache: cache)
            } catch {
                throw nested(ImageError(.backingFileOpen, path: image.path, message: "Could not open backing file '\(full)' of '\(image.path)'", cause: error),
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
            // Locked after the loop check: a loop back to a writable top would otherwise be
            // reported as a lock conflict with ourselves instead of as the loop it is.
            do {
                try lock(backing, locking, writable: false)
            } catch {
                try? backing.close()
                throw nested(ImageError(.backingFileOpen, path: image.path, message: "Could not open backing file '\(full)' of '\(image.path)'", cause: error),
                             from: top, to: image)
            }
            seen[identity] = full
            image.attachBacking(backing)
            current = backing
        }
    }

    /// Wraps the failure to open `image`'s backing file in one "Could not open backing file"
    /// error per level above it, as QEMU nests them: qemu-img prints the chain as
    /// "Could not open 'top': Could not open backing file: Could not open backing file: ...".
    /// Each level is an ImageError whose path is the image whose backing file failed and
    /// whose cause is the level below (the innermost cause is the real error).
    private static func nested(_ error: ImageError, from top: any DiskImage, to image: any DiskImage) -> ImageError {
        // The images from the top down to (not including) `image`.
        var above: [any DiskImage] = []
        var walk: (any DiskImage)? = top
        while let w = walk, w !== image {
            above.append(w)
            walk = w.backing
        }
        var result = error
        var below: any DiskImage = image
        for parent in above.reversed() {
            result = ImageError(.backingFileOpen, path: parent.path, message: "Could not open backing file '\(below.path)' of '\(parent.path)'", cause: result)
            below = parent
        }
        return result
    }

    /// The file that identifies an image: the image file itself (not an external data file).
    private static func mainFile(of image: any DiskImage) -> DiskFile { image.file }
}
