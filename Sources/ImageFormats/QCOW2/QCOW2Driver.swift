import DiskIO

/// The qcow2 format (QCOW2Image, QCOW2Create, QCOW2Checker).
struct QCOW2Driver: FormatDriver {
    var name: String { "qcow2" }
    var capabilities: FormatCapabilities { [.check, .backingFiles, .compressedWrites, .snapshots] }

    /// The magic and a version other than 1 (QEMU calls version 1 "qcow"); versions simg does
    /// not know are refused by the opener, in QEMU's words.
    func probe(header: [UInt8]) -> Int {
        guard header.count >= 8, header[0] == 0x51, header[1] == 0x46, header[2] == 0x49, header[3] == 0xFB else { return 0 }
        return QCOW2BE.u32(header, 4) == 1 ? 0 : 100
    }

    func open(file: DiskFile, location: ImageLocation, header: [UInt8]?, writable: Bool) throws -> any DiskImage {
        try QCOW2Image.open(file: file, location: location, header: header, writable: writable)
    }

    /// qcow2 throws the IOError itself (the CLI words it "Could not open 'FILE': REASON").
    func openFailure(_ error: any Error, location: ImageLocation) -> any Error { error }

    var createOptions: [CreateOptionSpec] { CreateOptionTables.qcow2 }

    func create(_ job: FormatCreateJob) throws {
        do {
            var parameters = try Self.parameters(path: job.path, size: job.size, options: job.options)
            parameters.cache = job.cache
            let layout: QCOW2Layout
            do {
                layout = try QCOW2Create.layout(for: parameters)
            } catch {
                throw ImageError(path: job.path,
                                 message: "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
            }
            try QCOW2Create.write(parameters, layout: layout, created: job.created)
        } catch {
            // QEMU deletes the image and data file it created when creation fails; so does
            // simg, for the regular files it created (QEMU also creates the files before its
            // qcow2 checks; simg checks first, so a refused option leaves a file that was
            // there untouched).
            job.created.removeAll()
            throw error
        }
    }

    func check(file: DiskFile, path: String, repair: CheckRepair, report: @escaping (String) -> Void,
               reportError: @escaping (String) -> Void) throws -> ImageCheckResult {
        try QCOW2Checker.check(file: file, path: path, repair: repair, report: report, reportError: reportError)
    }

    /// Turns the options into creation parameters with QEMU's checks, in QEMU's order.
    static func parameters(path: String, size rawSize: UInt64,
                                options: ParsedCreateOptions) throws -> QCOW2CreateParameters {
        func fail(_ message: String) -> ImageError { ImageError(path: path, message: message) }

        if options.bool("encryption") == true && options.isSet("encrypt.format") {
            throw fail("'encrypt.format' and its alias 'encryption' can't be used at the same time")
        }
        if let hint = options.unsigned("extent_size_hint"), hint > UInt64(UInt32.max) {
            throw fail("Extent size hint is too large")
        }

        // Enumerations, in the order QEMU's option visitor meets them.
        var p = QCOW2CreateParameters(path: path, size: rawSize)
        if let compat = options.string("compat") {
            switch compat {
            case "0.10", "v2": p.version = 2
            case "1.1", "v3": p.version = 3
            default: throw fail("Parameter 'version' does not accept value '\(compat)'")
            }
        }
        if let format = options.string("backing_fmt"), !ImageFormat.qemuDrivers.contains(format) {
            throw fail("Parameter 'backing-fmt' does not accept value '\(format)'")
        }
        let encryptionOptions = options.values.keys.filter { $0.hasPrefix("encrypt.") }
        if options.bool("encryption") == true || !encryptionOptions.isEmpty {
            throw fail("Encrypted images are not supported by simg")
        }
        if let mode = options.string("preallocation") {
            guard let parsed = QCOW2CreateParameters.Preallocation(rawValue: mode) else {
                throw fail("Parameter 'preallocation' does not accept value '\(mode)'")
            }
            p.preallocation = parsed
        }
        if let compression = options.string("compression_type") {
            switch compression {
            case "zlib": p.compressionType = 0
            case "zstd": p.compressionType = 1
            default: throw fail("Parameter 'compression-type' does not accept value '\(compression)'")
            }
        }

        // QEMU silently rounds the size up to a multiple of 512.
        guard rawSize <= UInt64(Int64.max) - 511 else {
            throw fail("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
        }
        p.size = (rawSize + 511) / 512 * 512

        p.extendedL2 = options.bool("extended_l2") ?? false
        if p.extendedL2 && p.version < 3 {
            throw fail("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        let clusterSize = options.unsigned("cluster_size") ?? 65536
        guard clusterSize >= 512, clusterSize <= 2 << 20, clusterSize & (clusterSize - 1) == 0 else {
            throw fail("Cluster size must be a power of two between 512 and 2048k")
        }
        if p.extendedL2 && clusterSize < 16384 {
            throw fail("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        p.clusterBits = clusterSize.trailingZeroBitCount

        p.backingFile = options.string("backing_file")
        p.backingFormat = options.string("backing_fmt")
        if p.backingFile != nil && p.preallocation != .off && !p.extendedL2 {
            throw fail("Backing file and preallocation can only be used at the same time if extended_l2 is on")
        }
        if p.backingFormat != nil && p.backingFile == nil {
            throw fail("Backing format cannot be used without backing file")
        }
        if let name = p.backingFile, FileName.byteCount(name) > Int(QCOW2Header.maxBackingNameLength) {
            throw fail("Could not assign backing file '\(name)': the name is longer than 1023 bytes")
        }

        p.lazyRefcounts = options.bool("lazy_refcounts") ?? false
        if p.version < 3 && p.lazyRefcounts {
            throw fail("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        let refcountBits = options.unsigned("refcount_bits") ?? 16
        guard refcountBits <= 64, refcountBits != 0, refcountBits & (refcountBits - 1) == 0 else {
            throw fail("Refcount width must be a power of two and may not exceed 64 bits")
        }
        if p.version < 3 && refcountBits != 16 {
            throw fail("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
        }
        p.refcountOrder = refcountBits.trailingZeroBitCount

        if let dataName = options.string("data_file") {
            // A name in QEMU's syntax, as the image's own: file:d.raw creates (and the header
            // names) d.raw; a protocol QEMU does not know is refused, json: too.
            if ImageName.protocolName(of: dataName) == "json" { throw fail("Unknown protocol 'json'") }
            do { p.dataFile = try ImageName.parse(dataName).path } catch let error as ImageError {
                throw fail(error.message)
            }
        }
        p.dataFileRaw = options.bool("data_file_raw") ?? false
        if p.dataFileRaw && p.dataFile == nil { throw fail("data-file-raw requires data-file") }
        if p.dataFileRaw && p.backingFile != nil {
            throw fail("Backing file and data-file-raw cannot be used at the same time")
        }
        // A raw data file must read the same with or without the metadata: map it 1:1.
        if p.dataFileRaw && p.preallocation == .off { p.preallocation = .metadata }
        if p.dataFile != nil && p.version < 3 {
            throw fail("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        if p.compressionType != 0 && p.version < 3 {
            throw fail("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        return p
    }
}
