import DiskIO
import Glibc
import ImageFormats
import Pipeline

/// `simg convert`: qemu-img convert's command line over simg's copy pipeline.
enum ConvertCommand {
    static let command = Command(
        name: "convert",
        synopsis: "convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] "
            + "[-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num] [-W] [-C] "
            + "[--target-is-zero] [--no-reflink] [--salvage] [--bitmaps [--skip-broken-bitmaps]] [--object objectdef] "
            + "[--image-opts] [--target-image-opts] [--stats] filename [filename2 [...]] output_filename",
        details: [
            "Converts the images 'filename' (several are concatenated) to 'output_filename' in format",
            "'output_fmt' (raw by default).",
            "  '-t'/'-T' cache mode of the target/source: none, writeback, writethrough, directsync,",
            "    unsafe (defaults: -t unsafe, -T writeback); none and directsync use O_DIRECT",
            "  '-S' zero-detection granularity (default 4k); 0 writes everything (fully allocated)",
            "  '-c' compressed qcow2 output; '-B' output with a backing file holding only the differences",
            "  '-n' writes into an existing target; '--target-is-zero' says it reads as zeros",
            "  '-p' shows progress (qemu-img's meter); '--progress=json' JSON lines on stderr, phase",
            "       \"copy\" (see README); '-m' and '-W' are accepted as in qemu-img",
            "  '-l' converts internal snapshot 'snapshot_param' (snapshot.id=ID,snapshot.name=NAME, or",
            "    an ID or name) instead of the active layer",
            "  '-r' limits the copy to 'rate_limit' bytes of data per second (suffixes k, M, G, ...)",
            "  '-C' copy offloading: data runs of plain files go through copy_file_range (the kernel",
            "    copies, or clones where the file system shares extents)",
            "  '--no-reflink': without it, data runs on the file system's block grid are cloned",
            "    (FICLONERANGE, extents shared as with cp --reflink=auto) where source and target",
            "    are plain files on one file system that can share extents (XFS reflink, btrfs)",
            "  '--salvage' reads a failing range sector by sector: unreadable sectors become zeros,",
            "    each with a warning; ranges past the end of a truncated image read as zeros anyway",
            "  '--bitmaps' copies the source's persistent bitmaps (qcow2 to qcow2); with",
            "    '--skip-broken-bitmaps' inconsistent ones are left out with a warning instead of refused",
            "  '--image-opts'/'--target-image-opts': the sources/target are option lists",
            "    (driver=qcow2,file.filename=disk.qcow2; file.driver=file); the target one needs -n",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
            "  '--stats' prints what the copy did as JSON on stderr",
            "  '-U' (force share) reads sources another process has open for writing",
        ],
        options: [
            CommandSupport.forceShareOption, .flag("c", "compress"),
            .flag("n", "no-create"), CommandSupport.formatOption, .value("t", "cache"),
            .value("T", "source-cache"), .value("O", "output-format"), .value("B", "backing"),
            .value("F", "backing-format"), .value("o", "options"), .value("S", "sparse-size"),
            .value("m", "coroutines"), .flag("W", "out-of-order"), .flag("C", "copy-offload"),
            .value("r", "rate"), .value("l", "snapshot"),
            .long("target-is-zero"), .long("no-reflink"), .long("stats"), .long("salvage"),
            .long("bitmaps"), .long("skip-broken-bitmaps"), CommandSupport.objectOption,
            CommandSupport.imageOptsOption, .long("target-image-opts"),
            // Tuning (not in qemu-img): request size, buffers in flight, I/O threads.
            .long("buffer-size", takesValue: true), .long("queue-depth", takesValue: true),
            .long("io-threads", takesValue: true),
        ] + Progress.optionSpecs,
        modifiesImages: { _ in true },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img parses -m, -l, -r and -S and creates each --object while it reads its
        // options, in command-line order: the first bad one is the first error.
        var options = ConvertOptions()
        var snapshot: MeasureCommand.SnapshotParameter?
        if try CommandSupport.objects(scan, console: console, parsing: [
            "coroutines": { text in
                guard let n = Int(text), (1...16).contains(n) else {
                    throw CLIError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
                }
            },
            "snapshot": { snapshot = try MeasureCommand.snapshotParameter($0) },
            "rate": { options.rateLimit = try CommandSupport.cvtnum($0, "rate limit") },
            "sparse-size": { options.sparseSize = try sparseSize($0) },
        ]) { return 0 }
        let imageOpts = scan.has("image-opts"), targetImageOpts = scan.has("target-image-opts")
        let noCreate = scan.has("no-create")
        let compress = scan.has("compress")
        let targetIsZero = scan.has("target-is-zero")
        let optionText = try OptionList.join(scan.values("options"))
        let outputFormatName = scan.last("output-format") ?? "raw"

        let targetCache = try CommandSupport.cacheMode(scan, "cache", default: .unsafe, source: false)
        let sourceCache = try CommandSupport.cacheMode(scan, "source-cache", default: .writeback, source: true)
        if scan.has("copy-offload") {
            if compress { throw CLIError("Cannot enable copy offloading when -c is used") }
            if scan.has("sparse-size") { throw CLIError("Cannot enable copy offloading when -S is used") }
            if scan.has("salvage") { throw CLIError("Cannot use copy offloading in salvaging mode") }
            options.copyOffload = true
        }
        options.reflink = !scan.has("no-reflink")
        if targetIsZero && !noCreate { throw CLIError("--target-is-zero requires use of -n flag") }
        if imageOpts && scan.has("format") { throw CLIError("--image-opts and --format are mutually exclusive") }
        if targetImageOpts && !noCreate { throw CLIError("--target-image-opts requires use of -n flag") }
        // (sic: qemu-img names --image-opts here too.)
        if targetImageOpts && scan.has("output-format") {
            throw CLIError("--image-opts and --format are mutually exclusive")
        }
        if scan.has("skip-broken-bitmaps") && !scan.has("bitmaps") {
            throw CLIError("Use of --skip-broken-bitmaps requires --bitmaps")
        }
        try applyTuning(scan, to: &options)

        if let optionText, OptionList.wantsHelp(optionText) {
            let format = try CommandSupport.creatableFormat(outputFormatName)
            console.out(CreateCommand.optionHelp(for: format, filename: scan.operands.count > 1 ? scan.operands.last : nil))
            return 0
        }
        guard scan.operands.count >= 2 else { throw CLIError("Must specify image file name") }
        let sourcePaths = Array(scan.operands.dropLast())
        let outputText = scan.operands[scan.operands.count - 1]
        // --target-image-opts: the option list becomes the json: name of the existing target.
        let output = targetImageOpts ? try ImageOpts.jsonName(outputText, console: console) : outputText
        if noCreate && optionText != nil { throw CLIError("-o has no effect when skipping image creation") }
        try Progress.checkFormat(scan)
        return try convert(scan, console, options: options, sourcePaths: sourcePaths, output: output,
                           outputText: outputText, snapshot: snapshot,
                           optionText: optionText, outputFormatName: outputFormatName,
                           caches: (targetCache, sourceCache))
    }

    /// From where qemu-img starts its meter (1 % steps; 0 % printed, the newline at the end
    /// whatever happens) to the end of the copy.
    private static func convert(_ scan: ScanResult, _ console: Console, options: ConvertOptions,
                                sourcePaths: [String], output: String, outputText: String,
                                snapshot: MeasureCommand.SnapshotParameter?,
                                optionText: String?, outputFormatName: String,
                                caches: (target: CacheMode, source: CacheMode)) throws -> Int32 {
        var options = options
        let imageOpts = scan.has("image-opts"), targetImageOpts = scan.has("target-image-opts")
        let quiet = scan.has("quiet")
        let (targetCache, sourceCache) = caches
        let noCreate = scan.has("no-create")
        let compress = scan.has("compress")
        let targetIsZero = scan.has("target-is-zero")
        let progress = try Progress.make(scan, minSkip: 1, console: console)
        defer { progress.end() }
        progress.meter(0, max: 100)

        // As qemu-img, which fails opening the first source with it.
        let sourceFormat = imageOpts ? nil : try CommandSupport.format(scan, opening: sourcePaths[0])
        let outputFormat = targetImageOpts ? try targetFormat(output, shown: outputText, console: console)
                                           : try CommandSupport.creatableFormat(outputFormatName)
        let createOptions = (optionText.map(OptionList.parse) ?? []).filter { $0.name != "size" }
        let backingFile = scan.last("backing") ?? createOptions.last(where: { $0.name == "backing_file" })?.value
        let backingFormat = scan.last("backing-format") ?? createOptions.last(where: { $0.name == "backing_fmt" })?.value
        if compress && !outputFormat.capabilities.contains(.compressedWrites) {
            throw CLIError("Compression not supported for this file format")
        }
        // Compressed clusters must be written into unallocated clusters, so a preallocated
        // target could never take them; qemu-img refuses this before creating anything.
        if compress, let prealloc = createOptions.last(where: { $0.name == "preallocation" })?.value, prealloc != "off" {
            throw CLIError("Compression and preallocation not supported at the same time")
        }
        if backingFile != nil {
            if !outputFormat.capabilities.contains(.backingFiles) {
                throw CLIError("Backing file not supported for file format '\(outputFormat.rawValue)'")
            }
            if backingFormat == nil { throw CLIError("Use of backing file requires explicit backing format") }
        } else if backingFormat != nil && !outputFormat.capabilities.contains(.backingFiles) {
            throw CLIError("Backing file format not supported for file format '\(outputFormat.rawValue)'")
        }
        options.keepBacking = backingFile != nil

        // Sources, each with its backing chain.
        var sources: [any DiskImage] = []
        defer { for source in sources { try? source.close() } }
        for path in sourcePaths {
            // -U: the sources share everything, as with qemu-img (the target never does).
            // qemu-img convert opens each source with its chain as one block graph: a failure
            // below the top (a backing file in use or missing, a data file) reads "Could not
            // open 'TOP': Could not open backing file: ...", as in check.
            let openOptions = OpenOptions(format: sourceFormat, writable: false, cache: sourceCache,
                                          locking: CommandSupport.readLocking(scan))
            sources.append(try CommandSupport.open(path, imageOpts: imageOpts, openOptions, wording: .wholeChain,
                                                   console: console))
        }
        // qemu-img reads what a truncated image's tables point at past its end as zeros.
        for source in sources {
            var layer: (any DiskImage)? = source
            while let image = layer {
                (image as? any PastEndZeroReading)?.readPastEndAsZeros()
                layer = image.backing
            }
        }
        if let snapshot {
            // An ID or name (not a snapshot.* list) cannot apply to several sources; a list is
            // loaded in the first source only, as in qemu-img (sic: "snapshot").
            if case .idOrName = snapshot, sources.count > 1 {
                throw CLIError("No support for concatenating multiple snapshot")
            }
            try MeasureCommand.load(snapshot, in: sources[0])
        }
        let bitmaps = try bitmapsToCopy(scan, sources: sources)
        // Before anything is created: sizes from qcow2 headers can add up past 2^64 - 1.
        let totalSize = try ConvertPlanner.totalSize(of: sources)

        // Writing over a file being read would destroy it; QEMU's image locks refuse that.
        if isInUse(output, by: sources) {
            let lock = "Failed to get \"write\" lock\nIs another process using the image [\(output)]?"
            throw CLIError(noCreate ? "Could not open '\(output)': \(lock)"
                                    : "\(output): error while converting \(outputFormat.rawValue): \(lock)")
        }

        if !noCreate {
            // The output's protocol is looked up once the sources are open; qemu-img names no
            // file in this message. json: names an existing image only (with -n).
            if let proto = ImageName.protocolName(of: output), proto == "json" || (try? ImageName.parse(output)) == nil {
                throw CLIError(proto == "json" ? "Unknown protocol 'json'" : Backend.nameProblem(output))
            }
            var request = CreateRequest(format: outputFormat, path: output, size: totalSize,
                                        options: createOptions.map { CreateOption(name: $0.name, value: $0.value) },
                                        backingFile: scan.last("backing"), backingFormat: scan.last("backing-format"),
                                        unsafeBacking: false)
            // -t unsafe covers the create step too: no sync at all, only the write order.
            request.cache = targetCache
            do {
                try Backend.create(request, announce: { _ in }, warn: { console.error("warning: " + $0) })
            } catch let error as ImageError where error.path == output {
                // An option the format does not have: qemu-img names no file.
                if error.kind == .invalidParameter { throw CLIError(error.message) }
                // Another process has the target open: refused before it was touched.
                if let lock = error.cause as? ImageLockError {
                    throw CLIError("\(output): error while converting \(outputFormat.rawValue): \(lock)")
                }
                if let io = error.cause as? IOError, io.operation == .create {
                    throw CLIError("\(output): error while converting \(outputFormat.rawValue): \(io)")
                }
                var message = "\(output): error while converting \(outputFormat.rawValue): \(error.message)"
                if let cause = error.cause { message += ": \(cause)" }
                throw CLIError(message)
            } catch let io as IOError {
                throw CLIError("\(output): error while converting \(outputFormat.rawValue): \(io)")
            }
        }

        if bitmaps != nil { try checkBitmapTarget(output, format: outputFormat) }
        // Cache mode unsafe ignores flushes (QEMU's cache.no-flush): no sync at all.
        let target = try openTarget(output, shown: outputText, format: outputFormat, cache: targetCache,
                                    startsZeroed: !noCreate || targetIsZero, assumeZero: targetIsZero,
                                    compress: compress, sparse: options.sparseSize)
        if noCreate && target.virtualSize < totalSize {
            target.abandon()
            throw CLIError("output file is smaller than input file")
        }

        options.salvage = scan.has("salvage")
        if !quiet {
            let printer = WarningPrinter(console: console)
            options.warn = { printer.warn($0) }
        }
        if progress.isActive || progress.answersRequestsOnly {
            // qemu_progress_print(100.0 * allocated_done / allocated_sectors, 0): the double
            // ratio passed on as a float.
            options.progress = { done, total in
                progress.meter(Float(100.0 * Double(done) / Double(total)), max: 0)
                progress.bytes("copy", done: done, total: total)
            }
            // Without -p or json qemu's values cost a pass of block status: only once asked.
            if !progress.isActive { options.progressRequested = { Progress.requestPending } }
        }
        let pipeline: ConvertPipeline
        do {
            pipeline = try ConvertPipeline(sources: sources, target: target, options: options)
        } catch {
            target.abandon()
            throw error
        }
        progress.bytes("copy", done: 0, total: pipeline.progressTotal ?? totalSize)
        let stats = try pipeline.run()
        // qemu-img prints 100 % once more on success (then the newline, deferred above).
        progress.meter(100, max: 0)
        progress.finish("copy", total: pipeline.progressTotal ?? totalSize)
        if let bitmaps {
            try copyBitmaps(bitmaps, from: sources[0], to: output, format: outputFormat, cache: targetCache,
                            console: console)
        }
        if scan.has("stats") { console.err(stats.json + "\n") }
        return 0
    }

    /// `-S`: the sparse granularity, as qemu-img checks it.
    static func sparseSize(_ text: String) throws(CLIError) -> UInt64 {
        let value: UInt64
        do {
            value = try Backend.parseSize(text).value
        } catch {
            throw CLIError("Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for\nsimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        }
        guard value % 512 == 0, value <= 16 << 20 else {
            throw CLIError("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).")
        }
        return value
    }

    /// --target-image-opts: the target's format, the list's driver or else probed, as qemu-img
    /// opens it (only looked at here, without locks: the target is opened for writing next).
    static func targetFormat(_ name: String, shown: String, console: Console) throws -> ImageFormat {
        let image: any DiskImage
        do {
            image = try ImageOpener.open(name, options: OpenOptions(openBacking: false, locking: .none))
        } catch {
            throw CLIError(CommandSupport.openFailure(error, path: name, shown: shown, wording: .deepestImage))
        }
        defer { try? image.close() }
        return image.format
    }

    /// Whether `path` names a file some source image (or a layer below it) has open.
    static func isInUse(_ path: String, by sources: [any DiskImage]) -> Bool {
        guard let target = ImageName.identity(of: path) else { return false }
        for source in sources {
            var layer: (any DiskImage)? = source
            while let image = layer {
                if image.files.contains(where: { (try? FileIdentity(of: $0)) == target }) { return true }
                layer = image.backing
            }
        }
        return false
    }

    /// `--buffer-size`, `--queue-depth`, `--io-threads`, or SIMG_BUFFER_SIZE, SIMG_QUEUE_DEPTH,
    /// SIMG_IO_THREADS in the environment (the options win).
    static func applyTuning(_ scan: ScanResult, to options: inout ConvertOptions) throws {
        func setting(_ key: String, _ variable: String) -> String? {
            if let value = scan.last(key) { return value }
            guard let raw = getenv(variable) else { return nil }
            return String(cString: raw)
        }
        if let text = setting("buffer-size", "SIMG_BUFFER_SIZE") {
            guard let value = try? Backend.parseSize(text).value, value >= 4096, value <= 256 << 20 else {
                throw CLIError("Invalid buffer size: \(text) (4k to 256M)")
            }
            options.bufferSize = Int(value)
        }
        if let text = setting("queue-depth", "SIMG_QUEUE_DEPTH") {
            guard let value = Int(text), (1...256).contains(value) else {
                throw CLIError("Invalid queue depth: \(text) (1 to 256)")
            }
            options.queueDepth = value
        }
        if let text = setting("io-threads", "SIMG_IO_THREADS") {
            guard let value = Int(text), (1...64).contains(value) else {
                throw CLIError("Invalid number of I/O threads: \(text) (1 to 64)")
            }
            options.ioThreads = value
        }
    }

    /// `startsZeroed`: created now or --target-is-zero (`assumeZero`); a raw target on a
    /// device starts zeroed only when the user says so (Pipeline's TargetZeroes).
    /// `shown`: the target as the user wrote it (an option list, `path` its json: name).
    static func openTarget(_ path: String, shown: String? = nil, format: ImageFormat, cache: CacheMode, startsZeroed: Bool,
                           assumeZero: Bool, compress: Bool, sparse: UInt64) throws -> any ConvertTarget {
        do {
            return try ConvertTargetOpener.open(path, format: format, cache: cache, startsZeroed: startsZeroed,
                                                assumeZero: assumeZero, compress: compress, sparse: sparse)
        } catch {
            // A lock conflict (ImageLockError) reads "Could not open 'PATH': LOCK ERROR" too.
            throw CLIError(CommandSupport.openFailure(error, path: path, shown: shown, wording: .deepestImage))
        }
    }
}

/// Prints the copy's warnings (--salvage) as qemu-img's warn_report: "simg: warning: ...".
final class WarningPrinter: @unchecked Sendable {
    // @unchecked Sendable: only called from the pipeline's thread, which runs the command.
    private let console: Console

    init(console: Console) { self.console = console }

    func warn(_ message: String) { console.error("warning: " + message) }
}
