import DiskIO
import ImageFormats

/// `simg bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)... [-q]
/// [-f fmt] [-g granularity] [-b source_file [-F source_fmt]] FILE BITMAP` with qemu-img 7.2's
/// contract: the actions apply to bitmap BITMAP in the order given; the first refused one
/// stops the run ("Operation ACTION on bitmap BITMAP failed: REASON", exit 1) and the ones
/// before it are kept, as qemu-img keeps them when it closes the image. The image is opened
/// read-write without its backing chain (writer's locks), `-b`'s image read-only (reader's).
///
/// Everything is changed in memory and stored in one crash-safe switch at the end
/// (`BitmapEditor.commit`). Where qemu-img names a block node ('#block123', a number that
/// changes from run to run), simg names the image file.
enum BitmapCommand {
    static let command = Command(
        name: "bitmap",
        synopsis: "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-q] [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap",
        details: [
            "Changes the persistent dirty bitmap 'bitmap' of a qcow2 (v3) image.",
            "  '--add' creates it (empty, recording writes); '--remove' deletes it; '--clear' empties it",
            "  '--enable' / '--disable' start or stop its recording of guest writes",
            "  '--merge SOURCE' adds the dirty bits of bitmap SOURCE (of this image, or of",
            "           '-b source_file', opened read-only, its format '-F source_fmt')",
            "  the actions may be repeated and combined; they apply in the order given",
            "  '-g' the granularity of an added bitmap (a power of two, at least 512 bytes;",
            "       default: the cluster size, within 4 KiB and 64 KiB)",
            "  '-f' names the image's format instead of probing it",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2);",
            "       '-b source_file' stays a file name, as in qemu-img",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, .long("add"), .long("remove"), .long("clear"), .long("enable"),
                  .long("disable"), .long("merge", takesValue: true),
                  OptionSpec(short: "g", long: "granularity", takesValue: true, key: "granularity"),
                  OptionSpec(short: "b", long: "source-file", takesValue: true, key: "source-file"),
                  OptionSpec(short: "F", long: "source-format", takesValue: true, key: "source-format"),
                  CommandSupport.objectOption, CommandSupport.imageOptsOption],
        modifiesImages: { _ in true },
        run: run)

    enum Action {
        case add, remove, clear, enable, disable, merge(String)

        var verb: String {
            switch self {
            case .add: "add"
            case .remove: "remove"
            case .clear: "clear"
            case .enable: "enable"
            case .disable: "disable"
            case .merge: "merge"
            }
        }
    }

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        var actions: [Action] = []
        var granularity: UInt64 = 0
        // qemu-img collects the actions, parses -g and creates each --object while it reads
        // its options, in command-line order.
        if try CommandSupport.objects(scan, console: console, parsing: [
            "add": { _ in actions.append(.add) },
            "remove": { _ in actions.append(.remove) },
            "clear": { _ in actions.append(.clear) },
            "enable": { _ in actions.append(.enable) },
            "disable": { _ in actions.append(.disable) },
            "merge": { actions.append(.merge($0)) },
            "granularity": { granularity = try parseGranularity($0) },
        ]) { return 0 }
        let adds = actions.contains { if case .add = $0 { true } else { false } }
        let merges = actions.contains { if case .merge = $0 { true } else { false } }
        guard !actions.isEmpty else {
            throw CLIError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
        }
        if granularity != 0 && !adds { throw CLIError("granularity only supported with --add") }
        let sourceFile = scan.last("source-file")
        if scan.has("source-format") && sourceFile == nil { throw CLIError("-F only supported with -b") }
        if sourceFile != nil && !merges { throw CLIError("Merge bitmap source file only supported with --merge") }
        guard scan.operands.count == 2 else { throw CLIError("Expecting filename and bitmap name") }
        let filename = scan.operands[0], name = scan.operands[1]

        let format = try CommandSupport.format(scan, opening: filename)
        // With --image-opts only the image is an option list; -b stays a name, as in qemu-img.
        let imageOpts = scan.has("image-opts")
        let openName = try CommandSupport.imageName(filename, imageOpts: imageOpts, console: console)
        let image = try CommandSupport.open(openName, shown: filename,
                                            OpenOptions(format: format, writable: true, cache: .writeback, openBacking: false),
                                            wording: .deepestImage, console: console)
        defer { try? image.close() }
        CommandSupport.warnIfProbedForWriting(image, name: openName, written: filename, imageOpts: imageOpts,
                                              format: format, console: console)
        var source: (any DiskImage)?
        if let sourceFile {
            // (-F is not refused with --image-opts: -b is a name.)
            let sourceFormat = try CommandSupport.format(scan, "source-format", opening: sourceFile, imageOpts: false)
            source = try CommandSupport.open(sourceFile, OpenOptions(format: sourceFormat, writable: false, cache: .writeback,
                                                                     openBacking: false),
                                             wording: .deepestImage, console: console)
        }
        defer { try? source?.close() }

        let editor: (any BitmapEditor)?
        do {
            editor = try (image as? any BitmapImage)?.bitmapEditor()
        } catch {
            throw CLIError(CommandSupport.openFailure(error, path: openName, shown: filename, wording: .deepestImage))
        }
        var refusal: CLIError?
        for action in actions {
            do {
                try apply(action, name, editor: editor, image: image, source: source, granularity: granularity == 0 ? nil : granularity & 0xffff_ffff)
            } catch let failure as BitmapFailure {
                refusal = CLIError("Operation \(action.verb) on bitmap \(name) failed: \(failure.message)"
                                   + (failure.hint.map { "\n" + $0 } ?? ""))
                break
            } catch {
                refusal = CLIError("Operation \(action.verb) on bitmap \(name) failed: \(error)")
                break
            }
        }
        // What succeeded before a refusal is kept, as qemu-img stores its bitmaps on close.
        if let editor, editor.hasChanges {
            do {
                try editor.commit()
            } catch let error as InterruptedError {
                throw error.naming(filename, outcome: "keeps its bitmaps as they were")
            } catch {
                throw CLIError("Failed to store the bitmaps of '\(filename)': \(error)")
            }
        }
        try source?.close()
        try image.close()
        if let refusal { throw refusal }
        return 0
    }

    /// One action; raw images (no `BitmapImage`) are refused in QEMU's words.
    static func apply(_ action: Action, _ name: String, editor: (any BitmapEditor)?, image: any DiskImage,
                      source: (any DiskImage)?, granularity: UInt64?) throws {
        guard let editor else {
            if case .add = action {
                // The image file stands for QEMU's node name (also under a json: name or option list).
                throw BitmapFailure("Can't store persistent bitmaps to \(image.file.path): Operation not supported")
            }
            throw BitmapFailure.notFound(name)
        }
        switch action {
        case .add: try editor.add(name, granularity: granularity, disabled: false)
        case .remove: try editor.remove(name)
        case .clear: try editor.clear(name)
        case .enable: try editor.enable(name)
        case .disable: try editor.disable(name)
        case .merge(let from):
            try editor.merge(into: name, source: from) {
                guard let source else { return try editor.content(of: from) }
                guard let other = source as? any BitmapImage else { throw BitmapFailure.notFound(from) }
                return try other.loadBitmap(named: from)
            }
        }
    }

    /// `-g` as qemu-img's cvtnum("granularity"). 0 means the default; any other value is cut to
    /// 32 bits when the action uses it, as QMP's uint32 takes it (so 4G is given as 0, refused
    /// as "Granularity must be power of 2 and at least 512").
    static func parseGranularity(_ text: String) throws -> UInt64 {
        try CommandSupport.cvtnum(text, "granularity")
    }
}
