import DiskIO
import ImageFormats

/// The option handling every command shares, worded as qemu-img words it: `-f` (a format by
/// name), `-t`/`-T` (cache modes), `-U` (force share), `--output=human|json`, and opening an
/// image with qemu-img's "Could not open" sentences. A command uses these instead of parsing
/// the options itself, so the same mistake reads the same in every command.
///
/// What the protocol drivers require of a file (no directory, no FIFO; a regular file for
/// `file:`, a device for `host_device:`) is not checked here: ImageOpener checks it for every
/// image it opens and ConvertTargetOpener for convert's target
/// (`ImageOpener.checkProtocolDriver`), so opening through `open` below includes it.
enum CommandSupport {
    // MARK: Option table entries

    /// `-f fmt`: the image's format instead of probing it.
    static let formatOption = OptionSpec.value("f", "format")
    /// `-U` / `--force-share`.
    static let forceShareOption = OptionSpec(short: "U", long: "force-share", key: "force-share")
    /// `--output=human|json`.
    static let outputOption = OptionSpec.long("output", takesValue: true)
    /// `--image-opts`: the image operands are QEMU option lists (ImageOpts.swift).
    static let imageOptsOption = OptionSpec.long("image-opts")
    /// `--object objectdef` (secrets; ImageOpts.object).
    static let objectOption = OptionSpec.long("object", takesValue: true)

    // MARK: -f

    /// The format named by option `key` (`-f`), nil to probe. qemu-img fails opening `image`
    /// with it: "Could not open 'IMAGE': Unknown driver 'x'" (or simg's "not supported yet").
    /// With `--image-opts` any format option is refused, as qemu-img's img_open refuses it
    /// when it opens that image (compare's `-F` only at the second image).
    /// `imageOpts: false`: an image that is a name even with --image-opts (bitmap's -b).
    static func format(_ scan: ScanResult, _ key: String = "format", opening image: String,
                       imageOpts: Bool? = nil) throws(CLIError) -> ImageFormat? {
        guard let name = scan.last(key) else { return nil }
        if imageOpts ?? scan.has("image-opts") { throw CLIError("--image-opts and --format are mutually exclusive") }
        do { return try ImageFormat(named: name) } catch { throw CLIError("Could not open '\(image)': \(error)") }
    }

    /// A format to create (`create -f`, `convert -O`): `prefix` goes before the error
    /// ("FILE: " in create, nothing where qemu-img names no file).
    static func creatableFormat(_ name: String, prefix: String = "") throws(CLIError) -> ImageFormat {
        do { return try ImageFormat(named: name, creating: true) } catch { throw CLIError("\(prefix)\(error)") }
    }

    // MARK: -t / -T

    /// The cache mode given as option `key` (the last one wins), or `default`; qemu-img's error
    /// for a name it does not know, worded for a target (-t) or a source (-T) option.
    static func cacheMode(_ scan: ScanResult, _ key: String, default fallback: CacheMode, source: Bool) throws(CLIError) -> CacheMode {
        guard let name = scan.last(key) else { return fallback }
        guard let mode = CacheMode(name: name) else {
            throw CLIError(source ? "Invalid source cache option: \(name)" : "Invalid cache option: \(name)")
        }
        return mode
    }

    // MARK: -U

    /// Whether `-U` (force share) was given.
    static func forceShare(_ scan: ScanResult) -> Bool { scan.has("force-share") }

    /// The locks a read-only open of a source takes: QEMU's reader locks, or with -U none that
    /// refuse anyone (`.forceShare`).
    static func readLocking(_ scan: ScanResult) -> ImageLocking {
        forceShare(scan) ? .forceShare : .standard
    }

    // MARK: --output

    /// `--output`'s two layouts.
    enum OutputFormat: String {
        case human, json
    }

    /// `--output` (human by default), refused with qemu-img's words otherwise.
    static func outputFormat(_ scan: ScanResult) throws(CLIError) -> OutputFormat {
        try outputFormat(named: scan.last("output") ?? "human")
    }

    /// One `--output` value (measure checks each where qemu-img meets it).
    static func outputFormat(named name: String) throws(CLIError) -> OutputFormat {
        guard let output = OutputFormat(rawValue: name) else {
            throw CLIError("--output must be used with human or json as argument.")
        }
        return output
    }

    // MARK: Opening

    /// Which image qemu-img's "Could not open 'NAME': REASON" names.
    enum OpenWording {
        /// Each image opened on its own (info, convert's target): NAME is the deepest image
        /// that failed, maybe a backing file some levels down.
        case deepestImage
        /// The image and its backing chain opened as one block graph (check, convert's
        /// sources, rebase): a failure below the top still names the top, with one "Could not
        /// open backing file: " per level.
        case wholeChain
    }

    /// qemu-img's cvtnum: a size with suffixes, 0 ... INT64_MAX, else its sentence naming `what`
    /// ("start offset", "rate limit", "granularity", ...).
    static func cvtnum(_ text: String, _ what: String) throws -> UInt64 {
        do {
            return try SizeParser.parseImageSize(text)
        } catch SizeParser.Error.outOfRange {
            throw CLIError("Invalid \(what) specified. Must be between 0 and \(Int64.max).")
        } catch {
            throw CLIError("Invalid \(what) specified. You may use k, M, G, T, P or E suffixes for\n"
                           + "simg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        }
    }

    /// Opens `path` with `options` (ImageOpener: the name's syntax, the protocol driver's
    /// checks, the chain, the locks), a failure worded as qemu-img words it; the warnings
    /// qemu-img prints at every open go to `console` (`warnAtOpen`).
    /// `shown`: what the user wrote for `path` (an --image-opts list), quoted in failures.
    static func open(_ path: String, shown: String? = nil, _ options: OpenOptions, wording: OpenWording,
                     console: Console) throws(CLIError) -> any DiskImage {
        let image: any DiskImage
        do {
            image = try ImageOpener.open(path, options: options)
        } catch {
            throw CLIError(openFailure(error, path: path, shown: shown, wording: wording))
        }
        warnAtOpen(image, console)
        return image
    }

    /// `open`, or with `--image-opts` (`imageOpts`) the option list `path` opened by its
    /// json: name (`imageName`), the list quoted in failures: the entry point for a command
    /// adopting --image-opts; `--object` arguments go through `objects` first.
    static func open(_ path: String, imageOpts: Bool, _ options: OpenOptions, wording: OpenWording,
                     console: Console) throws(CLIError) -> any DiskImage {
        let name = try imageName(path, imageOpts: imageOpts, console: console)
        return try open(name, shown: path, options, wording: wording, console: console)
    }

    /// The name qemu-img's "Image format was not specified for 'NAME'" warning (an image
    /// probed and opened for writing) gives, or nil when the format was not probed: `-f`
    /// given, or a json: name or --image-opts list naming its driver. A list's warning names
    /// its file.
    static func probedFormatName(_ name: String, written: String, imageOpts: Bool, format: ImageFormat?) -> String? {
        guard format == nil else { return nil }
        guard let location = try? ImageName.parse(name) else { return written }
        if location.format != nil { return nil }
        return imageOpts ? location.displayName : written
    }

    /// qemu-img's warning for an image whose format was probed and that is opened for
    /// writing, if the format is one QEMU restricts then (raw) and it was probed
    /// (`probedFormatName`).
    static func warnIfProbedForWriting(_ image: any DiskImage, name: String, written: String, imageOpts: Bool,
                                       format: ImageFormat?, console: Console) {
        guard let probed = probedFormatName(name, written: written, imageOpts: imageOpts, format: format),
              (image as? any ResizableImage)?.warnsWhenProbedForWriting == true else { return }
        let format = image.format.rawValue
        console.err("""
            WARNING: Image format was not specified for '\(probed)' and probing guessed \(format).
                     Automatically detecting the format is dangerous for \(format) images, write operations on block 0 will be restricted.
                     Specify the '\(format)' format explicitly to remove the restrictions.

            """)
    }

    /// The name an image operand is opened by: with `--image-opts` the json: name of the
    /// option list `text` (ImageOpts.jsonName, which refuses a node reference as qemu-img
    /// does), else `text` itself. For commands that open the image more than once (compare's
    /// readers, check's repair): one parse, one deprecation warning, as in qemu-img.
    static func imageName(_ text: String, imageOpts: Bool, console: Console) throws(CLIError) -> String {
        imageOpts ? try ImageOpts.jsonName(text, console: console) : text
    }

    /// `--object` arguments in command-line order, each checked where qemu-img meets it in
    /// its getopt loop, among the other options it parses there: `parsing[key]` is called with
    /// each value of that option where it comes, so the first mistake on the command line is
    /// the one reported. True when an object was "help" (printed: the command exits 0, the
    /// options after it not looked at, as in qemu-img).
    static func objects(_ scan: ScanResult, console: Console,
                        parsing: [String: (String) throws -> Void] = [:]) throws -> Bool {
        var secrets = ImageOpts.Secrets()
        for option in scan.options {
            if option.key == "object", let value = option.value {
                if try ImageOpts.object(value, secrets: &secrets, console: console) { return true }
            } else if let parse = parsing[option.key] {
                try parse(option.value ?? "")
            }
        }
        return false
    }

    /// QEMU's warning at every open of an image (and of each backing file opened with it) whose
    /// bitmaps a program without bitmap support invalidated (the bitmaps extension is there, its
    /// autoclear bit is not). QEMU ends the second line without a newline (the next message runs
    /// on after it); simg ends the line.
    static func warnAtOpen(_ top: any DiskImage, _ console: Console) {
        var next: (any DiskImage)? = top
        while let image = next {
            if let bitmaps = image as? any BitmapImage, bitmaps.hasStaleBitmaps {
                console.error("warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent")
                console.err("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.\n")
            }
            next = image.backing
        }
    }

    /// qemu-img's sentence for a failed open of `path`: "Could not open 'NAME': REASON".
    /// A lock conflict from DiskIO (`ImageLockError`) reads "Could not open 'PATH': LOCK ERROR".
    /// `shown`: the name qemu-img quotes when the failing image is `path` itself, if the user
    /// wrote it otherwise (an --image-opts list, opened as the json: name `path`).
    static func openFailure(_ error: any Error, path: String, shown: String? = nil, wording: OpenWording) -> String {
        var (name, reason) = openFailureParts(error, path: path, wording: wording)
        if let shown, name == path { name = shown }
        return "Could not open '\(name)': \(reason)"
    }

    /// The NAME and REASON of `openFailure`'s sentence, for callers that word it differently.
    static func openFailureParts(_ error: any Error, path: String, wording: OpenWording) -> (name: String, reason: String) {
        switch wording {
        case .deepestImage: return deepestFailure(error, path: path)
        case .wholeChain: return chainFailure(error, path: path)
        }
    }

    /// qemu-img says "Could not open 'NAME': REASON" about the deepest failure only: NAME is the
    /// image that failed (maybe a backing file some levels down) and a failed open(2) reads
    /// "Could not open 'NAME': strerror" itself. The library nests one ImageError per chain
    /// level, so the sentence comes from the innermost error.
    private static func deepestFailure(_ error: any Error, path: String) -> (name: String, reason: String) {
        var innermost: ImageError?
        var current: any Error = error
        while let image = current as? ImageError {
            innermost = image
            guard let cause = image.cause else { return (image.path, image.message) }
            current = cause
        }
        if let io = current as? IOError, io.operation == .open {
            // A missing external data file: qemu-img names the image, then the data file.
            if let innermost, innermost.kind == .dataFileOpen { return (innermost.path, "\(io)") }
            // The name the file was asked for by (`file:x`, a json: name), else the file's.
            let asked = innermost?.path ?? path
            return (ImageName.filePath(of: asked) == io.path ? asked : io.path, "\(io)")
        }
        guard let innermost else { return (path, "\(current)") }
        return (innermost.path, "\(innermost.message): \(current)")
    }

    /// qemu-img check (and convert, rebase) opens the whole chain as one block graph, so a
    /// failure below the top reads "Could not open 'TOP': Could not open backing file: ...
    /// REASON" (one "Could not open backing file" per level), and a missing data file "Could
    /// not open 'TOP': Could not open 'DATA': strerror". A failure of the top image itself
    /// reads as `deepestFailure` words it.
    private static func chainFailure(_ error: any Error, path: String) -> (name: String, reason: String) {
        var levels = 0
        var current: any Error = error
        var last: ImageError?
        while let image = current as? ImageError, let cause = image.cause {
            if image.kind == .backingFileOpen {
                levels += 1
            } else if image.kind != .dataFileOpen {
                break
            }
            last = image
            current = cause
        }
        guard last != nil else { return deepestFailure(error, path: path) }
        var reason: String
        if let io = current as? IOError, io.operation == .open {
            reason = "\(io)"
        } else if let image = current as? ImageError {
            reason = image.cause == nil ? image.message : "\(image.message): \(image.cause!)"
        } else {
            reason = "\(current)"
        }
        reason = String(repeating: "Could not open backing file: ", count: levels) + reason
        return (path, reason)
    }

    /// Closes an image a command has finished writing: what the format stores at close
    /// (qcow2's persistent bitmaps) is written, and its failure reported. A SIGINT/SIGTERM seen
    /// there is not an error of the command, whose work is on disk by then: at most the
    /// bitmaps stay marked in use (as a killed qemu-img leaves them), and simg still dies of
    /// the signal at exit.
    static func closeFinished(_ image: any DiskImage) throws {
        do { try image.close() } catch is InterruptedError {}
    }
}
