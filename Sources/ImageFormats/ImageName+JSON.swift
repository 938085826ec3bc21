import DiskIO

/// `json:{...}` names: the image described as QEMU block options. simg reads the options that
/// describe a local file, with qemu-img's messages for what QEMU refuses too:
/// - `driver`: the format, `raw` or `qcow2` (left out, the file is probed);
/// - `file` (an object) or `file.driver` / `file.filename`: the protocol driver (`file`,
///   `host_device`, `host_cdrom`; left out, chosen from the name) and the file name;
/// - raw's `offset` and `size`: the image is that window of the file.
/// Any other option is refused naming it. Relative file names are relative to the current
/// directory (QEMU does not resolve names inside json: against the image that stores them).
extension ImageName {
    static func parseJSON(_ name: String) throws -> ImageLocation {
        let options = try JSONName(name: name)
        return try options.location()
    }
}

/// The flattened options of one json: name and the checks on them, in QEMU's order.
private struct JSONName {
    let name: String
    let members: [(key: String, value: JSONOptions.Value?)]

    init(name: String) throws {
        self.name = name
        do {
            members = try JSONOptions.parse(String(name.dropFirst("json:".count)))
        } catch {
            throw ImageError(path: name, message: error.message)
        }
    }

    func fail(_ message: String) -> ImageError { ImageError(path: name, message: message) }

    /// nil: the key is absent; .some(nil): present with an array value.
    func value(_ key: String) -> JSONOptions.Value?? {
        members.first { $0.key == key }.map { $0.value }
    }

    func string(_ key: String) throws -> String? {
        guard let found = value(key) else { return nil }
        guard case .string(let text)? = found else {
            throw fail("Invalid parameter type for '\(key)', expected: string")
        }
        return text
    }

    /// raw's offset/size: a JSON integer, or a string with qemu's size suffixes; null counts
    /// as absent. Anything else gets qemu's size error.
    func size(_ key: String) throws -> UInt64? {
        guard let found = value(key) else { return nil }
        let parsed: UInt64?
        switch found {
        case .number(let text)?: parsed = text.allSatisfy(\.isASCIIDigit) ? UInt64(text) : nil
        case .string(let text)?: parsed = try? SizeParser.parse(text)
        case .null?: return nil
        default: parsed = nil
        }
        guard let parsed else {
            throw fail("Parameter '\(key)' expects a non-negative number below 2^64\n"
                       + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                       + "and exabytes, respectively.")
        }
        return parsed
    }

    func location() throws -> ImageLocation {
        let format = try string("driver")
        if let format {
            if ImageLocation.Driver(rawValue: format) != nil {
                throw fail("simg opens images through a format driver ('raw' or 'qcow2'), not through the protocol driver '\(format)' alone")
            }
            do { _ = try ImageFormat(named: format) } catch { throw fail("\(error)") }
        }
        if case .string(let reference)?? = value("file") {
            // A string names a node of a running QEMU; qemu-img has none.
            throw fail("Cannot find device='\(reference)' nor node-name='\(reference)'")
        }
        let fileKeys = members.filter { $0.key.hasPrefix("file.") }
        if value("filename") != nil || fileKeys.isEmpty {
            throw fail(format != nil ? "A block device must be specified for \"file\"" : "Must specify either driver or file")
        }
        var (path, driver) = try protocolLayer(fileKeys)

        // The format layer.
        let formatShown = format ?? "raw"
        for (key, _) in members where !key.hasPrefix("file.") && key != "driver" {
            // raw's options; with no driver the probed format decides (see ImageOpener).
            if (format == "raw" || format == nil) && (key == "offset" || key == "size") { continue }
            // qcow2's encrypt.* options name the secret (--object) of an encrypted image,
            // which simg cannot open yet: said so, rather than only naming the option.
            if key.hasPrefix("encrypt."), JSONName.qemuFormatOptions.contains(key) {
                throw fail("Block format '\(formatShown)' option '\(key)' is not supported by simg: "
                           + "it does not open encrypted images yet")
            }
            throw fail(JSONName.qemuFormatOptions.contains(key)
                       ? "Block format '\(formatShown)' option '\(key)' is not supported by simg"
                       : "Block format '\(formatShown)' does not support the option '\(key)'")
        }
        if driver == nil, let status = FileStatus(path), status.isDevice { driver = .hostDevice }
        var location = ImageLocation(name: name, path: path, driver: driver)
        location.format = format
        guard format == "raw" || format == nil else { return location }
        location.rawOptions = ["offset", "size"].filter { value($0) != nil }
        if let offset = try size("offset") { location.rawOffset = offset }
        if let size = try size("size") { location.rawSize = size }
        if value("offset") != nil || value("size") != nil {
            location.displayName = windowName(driver: driver ?? .file, path: path)
        }
        return location
    }

    /// The file name and protocol driver from the `file.` options.
    private func protocolLayer(_ fileKeys: [(key: String, value: JSONOptions.Value?)]) throws
        -> (String, ImageLocation.Driver?) {
        var driver: ImageLocation.Driver?
        if let protocolDriver = try string("file.driver") {
            guard let known = ImageLocation.Driver(rawValue: protocolDriver) else {
                throw fail(ImageName.qemuProtocols.contains(protocolDriver)
                           ? "simg does not support the '\(protocolDriver)' protocol" : "Unknown driver '\(protocolDriver)'")
            }
            driver = known
        }
        let protocolShown = driver?.rawValue ?? "file"
        for (key, _) in fileKeys where key != "file.driver" && key != "file.filename" {
            let option = String(key.dropFirst("file.".count))
            throw fail(JSONName.qemuFileOptions.contains(option)
                       ? "Block protocol '\(protocolShown)' option '\(option)' is not supported by simg"
                       : "Block protocol '\(protocolShown)' doesn't support the option '\(option)'")
        }
        guard case .string(let path)?? = value("file.filename") else {
            throw fail("The '\(protocolShown)' block driver requires a file name")
        }
        // The file name as written: QEMU parses protocol prefixes only in plain names, never
        // in file.filename ("file:x" there is the file named "file:x"). Without file.driver,
        // a device opens through host_device and anything else through file, as a plain name.
        return (path, driver)
    }

    /// The name QEMU regenerates for a raw window (bdrv_refresh_filename): the options that
    /// make it one, as compact JSON in QDict order, values as they were written.
    private func windowName(driver: ImageLocation.Driver, path: String) -> String {
        var top: [(key: String, json: String)] = [("driver", QEMUJSON.quote("raw"))]
        for key in ["offset", "size"] {
            guard let found = value(key) else { continue }
            let json: String
            switch found {
            case .number(let text)?: json = text
            case .string(let text)?: json = QEMUJSON.quote(text)
            case .bool(let flag)?: json = flag ? "true" : "false"
            case .null?, nil: json = "null"
            }
            top.append((key, json))
        }
        let file = QEMUJSON.compactObject([("driver", QEMUJSON.quote(driver.rawValue)),
                                           ("filename", QEMUJSON.quote(path))])
        top.append(("file", file))
        return "json:" + QEMUJSON.compactObject(top)
    }

    /// Options QEMU's qcow2/raw drivers and the generic block layer take that simg does not
    /// (so the refusal says "not supported by simg" rather than QEMU's "does not support").
    static let qemuFormatOptions: Set<String> = [
        "node-name", "read-only", "auto-read-only", "force-share", "detect-zeroes", "discard",
        "cache.direct", "cache.no-flush", "backing", "data-file", "lazy-refcounts",
        "pass-discard-request", "pass-discard-snapshot", "pass-discard-other", "overlap-check",
        "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size", "cache-size",
        "cache-clean-interval", "encrypt.format", "encrypt.key-secret", "discard-no-unref",
    ]

    /// The same for the file protocol drivers.
    static let qemuFileOptions: Set<String> = [
        "node-name", "read-only", "auto-read-only", "force-share", "aio", "aio-max-batch",
        "locking", "pr-manager", "drop-cache", "x-check-cache-dropped", "discard", "detect-zeroes",
        "cache.direct", "cache.no-flush",
    ]
}

private extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}
