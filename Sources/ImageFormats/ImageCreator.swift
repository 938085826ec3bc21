import DiskIO

/// `create`: validates a request the way qemu-img 7.2 does, announces it with qemu-img's
/// "Formatting ..." line, and writes the new image.
///
/// Order of checks (as in QEMU's bdrv_img_create and qcow2_co_create_opts/qcow2_co_create):
/// option names and value types; size given twice; backing file (opened unless -u, to check
/// it and take its size); size missing; then the announcement; then format-specific checks.
/// A failure after the announcement removes the files creation started (QEMU deletes them too),
/// and only those: `CreatedFiles` removes a name only while it still leads to the regular file
/// this process created, never a device the image was written on (docs/SAFETY.md).
public enum ImageCreator {
    public static func create(_ request: CreateRequest, announce: (String) -> Void) throws {
        try create(request, announce: announce, warn: { _ in })
    }

    /// `warn` receives qemu-img's warnings (e.g. a hex size with a suffix), without "qemu-img: ".
    ///
    /// `request.path` is a name in QEMU's syntax: `file:x` creates the file `x` (messages still
    /// name `file:x`, as qemu-img's do); a protocol QEMU does not know is refused before
    /// anything else, and so is `json:`, which qemu-img create does not take either.
    public static func create(_ request: CreateRequest, announce: (String) -> Void,
                              warn: (String) -> Void) throws {
        let name = request.path
        if ImageName.protocolName(of: name) == "json" {
            throw ImageError(path: name, message: "Unknown protocol 'json'")
        }
        let location = try ImageName.parse(name)
        var fileRequest = request
        fileRequest.path = location.path
        do {
            try createFile(fileRequest, name: name, driver: location.driver, announce: announce, warn: warn)
        } catch let error as ImageError where error.path == location.path {
            // The file's own name, as the format creators use it, back to the name given.
            var renamed = error
            renamed.path = name
            throw renamed
        }
    }

    /// Creates `request.path`, a plain file or device name; `name` is what the user gave, and
    /// `driver` the protocol it named (`file:`, `host_device:`), if any.
    private static func createFile(_ request: CreateRequest, name: String, driver: ImageLocation.Driver?,
                                   announce: (String) -> Void, warn: (String) -> Void) throws {
        let path = request.path
        func fail(_ message: String, _ cause: (any Error)? = nil) -> ImageError {
            ImageError(path: path, message: message, cause: cause)
        }

        // A device target is QEMU's host_device protocol, with its own (fewer) options; a
        // protocol named in the name is the one used.
        let targetProtocol: CreateProtocol = switch driver {
        case .file?: .file
        case .hostDevice?, .hostCDROM?: .hostDevice
        case nil: CreateProtocol(path: path)
        }
        var options = ParsedCreateOptions(format: request.format, protocol: targetProtocol)
        for option in request.options {
            do {
                try options.set(option.name, option.value)
            } catch {
                throw ImageError(error.kind, path: path, message: error.message)
            }
        }
        options.warnings.forEach(warn)

        // Size: the argument, or -o size= (not both); 2^64-1 is QEMU's "no size" marker.
        if options.isSet("size") {
            if request.size != nil { throw fail("The image size must be specified only once") }
        } else if let size = request.size {
            options.values["size"] = .size(size)
        }

        // -b and -F override -o backing_file / backing_fmt.
        if let backing = request.backingFile {
            guard request.format.capabilities.contains(.backingFiles) else {
                throw fail("Backing file not supported for file format '\(request.format.rawValue)'")
            }
            options.values["backing_file"] = .string(backing)
        }
        if let backingFormat = request.backingFormat {
            guard request.format.capabilities.contains(.backingFiles) else {
                throw fail("Backing file format not supported for file format '\(request.format.rawValue)'")
            }
            options.values["backing_fmt"] = .string(backingFormat)
        }
        let backingFile = options.string("backing_file")
        let backingFormat = options.string("backing_fmt")
        if let backingFile {
            if backingFile == path || backingFile == name {
                throw fail("Error: Trying to create an image with the same filename as the backing file")
            }
            if backingFile.isEmpty { throw fail("Expected backing file name, got empty string") }
        }

        var size = options.unsigned("size").flatMap { $0 == UInt64.max ? nil : $0 }
        if let backingFile, !request.unsafeBacking {
            let full = ImageName.resolve(backing: backingFile, relativeTo: path)
            let backingSize = try openBacking(full, format: backingFormat, imagePath: path)
            if size == nil {
                size = backingSize
                options.values["size"] = .size(backingSize)
            }
        } else if let backingFile {
            if backingFormat == nil { throw fail("Backing file specified without backing format") }
            // qemu-img create -u stores any name; simg never writes one QEMU cannot open.
            if let problem = ImageName.backingNameProblem(backingFile) { throw fail(problem) }
        }
        guard let size else { throw fail("Image creation needs a size parameter") }

        announce("Formatting '\(name)', fmt=\(request.format.rawValue) \(options.printed)")
        try checkProtocol(driver, path: path)

        // Every file creation opens (and empties) is recorded, so a failure removes exactly
        // those: not a file whose lock refused us (another process has it open), not a device.
        let created = CreatedFiles()
        let job = FormatCreateJob(path: path, size: size, options: options, onDevice: targetProtocol == .hostDevice,
                                  created: created, cache: request.cache)
        do {
            try request.format.driver.create(job)
        } catch let error as InterruptedError {
            // A half-written image is not the image requested: whatever it created goes.
            created.removeAll()
            throw error.naming(path, outcome: ZeroBuffer.newImageOutcome)
        }
    }

    /// A protocol named in the name that does not fit the file, refused as QEMU's drivers
    /// refuse it, before anything is created or written: `file:` on a device (QEMU's file
    /// driver fails to truncate it), `host_device:` on anything but a device (it cannot create).
    private static func checkProtocol(_ driver: ImageLocation.Driver?, path: String) throws {
        let status = FileStatus(path)
        switch driver {
        case .file?:
            if status?.isDevice == true {
                throw ImageError(path: path, message: "Could not resize file: Invalid argument")
            }
        case .hostDevice?, .hostCDROM?:
            guard status?.isDevice != true else { return }
            let reason = status == nil
                ? "Could not open '\(path)': No such file or directory"
                : "'\(driver!.rawValue)' driver requires '\(path)' to be either a character or block device"
            throw ImageError(path: path, message: "Protocol driver '\(driver!.rawValue)' does not support image creation, and opening the image failed: \(reason)")
        case nil:
            return
        }
    }

    // MARK: - Backing file

    /// Opens the backing file (without its own backing chain) to check it and get its size.
    private static func openBacking(_ full: String, format: String?, imagePath: String) throws -> UInt64 {
        func fail(_ message: String, _ cause: (any Error)? = nil) -> ImageError {
            ImageError(path: imagePath, message: message, cause: cause)
        }
        var chosen: ImageFormat?
        if let format {
            do {
                chosen = try ImageFormat(named: format)
            } catch {
                // qemu-img names no file for a driver it does not know; simg names the backing
                // file it cannot open for one it does not have.
                throw fail(error.isQEMUDriver ? "Could not open '\(full)': \(error)\nCould not open backing image."
                                              : "\(error)\nCould not open backing image.")
            }
        }
        do {
            _ = try ImageName.parse(full)
        } catch let error as ImageError {
            // A name QEMU cannot even parse: qemu-img says only why ("Unknown protocol 'c'").
            throw fail("\(error.message)\nCould not open backing image.")
        }
        let image: any DiskImage
        do {
            // qemu-img create reads the backing file's size without taking any lock on it.
            image = try ImageOpener.open(full, options: OpenOptions(format: chosen, writable: false, openBacking: false,
                                                                    locking: .none))
        } catch let error as IOError {
            throw fail("\(error)\nCould not open backing image.")
        } catch let error as ImageError {
            throw fail("Could not open '\(full)': \(error.message)\nCould not open backing image.", error.cause)
        } catch {
            throw fail("Could not open '\(full)': \(error)\nCould not open backing image.")
        }
        let size = image.virtualSize
        let detected = image.format.rawValue
        try? image.close()
        guard format != nil else {
            throw fail("Backing file specified without backing format\nDetected format of \(detected).")
        }
        return size
    }
}
