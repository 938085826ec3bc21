import ImageFormats

/// `simg measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot] [-U] filename]`
///
/// The argument checks run in qemu-img's order (img_measure): the filename rules, then the
/// source is opened, then the output format and its options; the computation is
/// ImageMeasure's (ImageFormats), this file only parses and prints.
enum MeasureCommand {
    static let command = Command(
        name: "measure",
        synopsis: "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot] [-U] filename]",
        details: [
            "Shows how large a new image of format 'output_fmt' (raw by default) would be: for",
            "  'N' bytes of guest space (suffixes k, M, G, T, P, E), or to hold the contents of",
            "  'filename' (with its backing chain), with the '-o' options create takes",
            "  'required size' is what the data needs, 'fully allocated size' what every cluster",
            "    needs; 'bitmaps size' (a qcow2 v3 source and target) the persistent bitmaps",
            "  '--output' is 'human' (default) or 'json', as qemu-img prints them",
            "  '-U' (force share) reads an image another process has open for writing",
            "  '-l' measures internal snapshot 'snapshot' (snapshot.id=ID,snapshot.name=NAME, or",
            "    an ID or name) instead of the active layer",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, CommandSupport.forceShareOption, CommandSupport.outputOption,
                  .value("O", "output-format"), .value("o", "options"), .long("size", takesValue: true),
                  .value("l", "snapshot"), CommandSupport.imageOptsOption, CommandSupport.objectOption],
        modifiesImages: { _ in false },
        run: run)

    /// `-l`: `snapshot.id=ID,snapshot.name=NAME` (either or both), else an ID or name.
    enum SnapshotParameter {
        case idAndName(id: String?, name: String?)
        case idOrName(String)
    }

    /// qemu-img parses `-l` while it reads its options, so a bad list is its first error.
    static func snapshotParameter(_ scan: ScanResult) throws(CLIError) -> SnapshotParameter? {
        guard let text = scan.last("snapshot") else { return nil }
        return try snapshotParameter(text)
    }

    /// One `-l` value parsed.
    static func snapshotParameter(_ text: String) throws(CLIError) -> SnapshotParameter {
        guard text.hasPrefix("snapshot.") else { return .idOrName(text) }
        var id: String?, name: String?
        for (key, value) in OptionList.parse(text) {
            switch key {
            case "snapshot.id": id = value
            case "snapshot.name": name = value
            default:
                throw CLIError("Invalid parameter '\(key)'\nsimg: Failed in parsing snapshot param '\(text)'")
            }
        }
        return .idAndName(id: id, name: name)
    }

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img parses these and creates each --object while it reads its options, in
        // command-line order, before the operand checks.
        var snapshot: SnapshotParameter?, size: UInt64?
        if try CommandSupport.objects(scan, console: console, parsing: [
            "snapshot": { snapshot = try snapshotParameter($0) },
            "output": { _ = try CommandSupport.outputFormat(named: $0) },
            "size": { size = try CreateCommand.parseSize($0, console: console) },
        ]) { return 0 }
        let output = try CommandSupport.outputFormat(scan)
        if scan.operands.count > 1 { throw CLIError("At most one filename argument is allowed.") }
        let filename = scan.operands.first
        if filename == nil && (scan.has("image-opts") || scan.has("format") || scan.has("snapshot")) {
            throw CLIError("--image-opts, -f, and -l require a filename argument.")
        }
        if filename != nil && size != nil {
            throw CLIError("--size N cannot be used together with a filename.")
        }
        guard filename != nil || size != nil else {
            throw CLIError("Either --size N or one filename must be specified.")
        }
        let options = try OptionList.join(scan.values("options"))

        var source: (any DiskImage)?
        if let filename {
            let format = try CommandSupport.format(scan, opening: filename)
            source = try CommandSupport.open(filename, imageOpts: scan.has("image-opts"),
                                             OpenOptions(format: format, writable: false,
                                                         locking: CommandSupport.readLocking(scan)),
                                             wording: .wholeChain, console: console)
        }
        defer { if let source { try? source.close() } }
        if let snapshot, let source {
            try load(snapshot, in: source)
        }

        let formatName = scan.last("output-format") ?? "raw"
        let result: MeasureResult
        do {
            let format = try ImageMeasure.targetFormat(named: formatName)
            result = try ImageMeasure.measure(
                format: format, options: (options.map(OptionList.parse) ?? []).map { CreateOption(name: $0.name, value: $0.value) },
                size: size, source: source, warn: { console.error("warning: " + $0) })
        } catch let error as MeasureError {
            // qemu-img prints each line as its own error.
            throw CLIError(error.lines.joined(separator: "\nsimg: "))
        } catch let error as FormatNameError {
            throw CLIError("\(error)")
        }
        if scan.has("quiet") { return 0 }
        console.out(output == .json ? jsonText(result) : humanText(result))
        return 0
    }

    /// The snapshot shown instead of the active layer, refused in qemu-img's words.
    static func load(_ snapshot: SnapshotParameter, in source: any DiskImage) throws(CLIError) {
        guard let viewer = source as? any SnapshotViewingImage else {
            throw CLIError("Failed to load snapshot: Block format '\(source.format)' used by device '' does not support temporarily loading internal snapshots")
        }
        do {
            switch snapshot {
            case .idAndName(let id, let name): try viewer.loadSnapshotTemporarily(id: id, name: name)
            case .idOrName(let text): try viewer.loadSnapshotTemporarily(idOrName: text)
            }
        } catch let failure as SnapshotFailure {
            throw CLIError("Failed to load snapshot: \(failure)")
        } catch {
            throw CLIError("Failed to load snapshot: \(error)")
        }
    }

    static func humanText(_ result: MeasureResult) -> String {
        var text = "required size: \(result.required)\nfully allocated size: \(result.fullyAllocated)\n"
        if let bitmaps = result.bitmaps { text += "bitmaps size: \(bitmaps)\n" }
        return text
    }

    /// QEMU's BlockMeasureInfo as its QDict prints it: "bitmaps" (when present) hashes
    /// before the other two.
    static func jsonText(_ result: MeasureResult) -> String {
        var members: [(String, JSONValue)] = [("required", .uint(result.required)),
                                               ("fully-allocated", .uint(result.fullyAllocated))]
        if let bitmaps = result.bitmaps { members.append(("bitmaps", .uint(bitmaps))) }
        let object = JSONObject(members)
        return JSONWriter.pretty(.object(object)) + "\n"
    }
}
