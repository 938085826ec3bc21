import DiskIO
import Glibc
import ImageFormats

/// `simg amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force]
/// -o options filename` with qemu-img 7.2's contract (img_amend): `-o` is required; with `-f`
/// and `-o help` the format's amend options are listed without opening anything; otherwise the
/// image is opened read-write (the writer's lock, with its backing chain), `-o help` lists the
/// options of the format found, a format without amendment is refused, the options are parsed
/// against the format's amend table (an option only `create` takes gets QEMU's hint), and the
/// image applies them (`AmendableImage`). `-p` prints qemu-img's meter: 0%, the driver's steps, 100%.
enum AmendCommand {
    static let command = Command(
        name: "amend",
        synopsis: "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename",
        details: [
            "Changes format-specific options of an existing image in place (qcow2: compat,",
            "refcount_bits, lazy_refcounts, size, data_file, data_file_raw; 'simg amend -f qcow2 -o help x'",
            "lists them). Options only 'create' takes (cluster_size, preallocation, ...) are refused.",
            "  '-o' the options, name=value separated by commas (several -o are joined)",
            "  '-f' names the image's format instead of probing it",
            "  '-t' the cache mode the image is opened with (default writeback)",
            "  '-p' shows progress (qemu-img's meter); '-q' prints nothing but errors",
            "  '--progress=json' JSON lines on stderr, phase \"amend\" (see README)",
            "  '--force' is accepted as in qemu-img (it matters only for LUKS key slots)",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, .value("o", "options"), .value("t", "cache"),
                  .long("force"), CommandSupport.objectOption, CommandSupport.imageOptsOption] + Progress.optionSpecs,
        modifiesImages: { _ in true },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img creates each --object while it reads its options: before the -o check.
        if try CommandSupport.objects(scan, console: console) { return 0 }
        guard let optionText = try OptionList.join(scan.values("options")) else {
            throw CLIError.usage("Must specify options (-o)")
        }
        // qemu-img starts its meter (1 % steps, nothing printed yet) once -o was accepted and
        // ends it with a newline whatever happens after (qemu_progress_end), help and
        // failures included.
        let progress = try Progress.make(scan, minSkip: 1, console: console)
        defer { progress.end() }
        let wantsHelp = OptionList.wantsHelp(optionText)
        if let name = scan.last("format"), wantsHelp {
            // A format named: its options, without opening the image (or needing one).
            console.out(try optionHelp(formatNamed: name))
            return 0
        }
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError("Expecting one image file name")
        }
        let cache = try CommandSupport.cacheMode(scan, "cache", default: .writeback, source: false)
        let format = try CommandSupport.format(scan, opening: filename)
        let imageOpts = scan.has("image-opts")
        let name = try CommandSupport.imageName(filename, imageOpts: imageOpts, console: console)
        let image = try CommandSupport.open(name, shown: filename,
                                            OpenOptions(format: format, writable: true, cache: cache, openBacking: true),
                                            wording: .wholeChain, console: console)
        defer { try? image.close() }
        CommandSupport.warnIfProbedForWriting(image, name: name, written: filename, imageOpts: imageOpts,
                                              format: format, console: console)
        if wantsHelp {
            console.out(try optionHelp(formatNamed: image.format.rawValue))
            return 0
        }
        guard let amendable = image as? any AmendableImage, let table = AmendOptions.table(for: image.format) else {
            throw CLIError("Format driver '\(image.format.rawValue)' does not support option amendment")
        }
        // The driver's steps: amend_status_cb's qemu_progress_print(100.f * offset / total, 0).
        let request = AmendRequest(values: try parse(optionText, table: table, format: image.format), force: scan.has("force"),
                                   progress: { done, total in
                                       if total > 0 { progress.meter(Float(100) * Float(done) / Float(total), max: 0) }
                                   })
        // qemu-img prints 0% before and 100% after the driver's work, whether it failed or not.
        progress.meter(0, max: 0)
        progress.bytes("amend", done: 0, total: 1)
        defer { progress.meter(100, max: 0) }
        do {
            try amendable.amend(request)
            try image.flush()
            // Closing stores what the format keeps until then (qcow2's persistent bitmaps, which
            // a size change resizes).
            try CommandSupport.closeFinished(image)
            progress.finish("amend", total: 1)
        } catch let error as AmendError {
            throw CLIError(error.message)
        } catch let error as InterruptedError {
            throw error.naming(filename, outcome: "was amended only in part (each step is complete or not done)")
        }
        return 0
    }

    /// qemu-img's print_amend_option_help: the format's amend options, laid out as create's.
    static func optionHelp(formatNamed name: String) throws -> String {
        let format: ImageFormat
        do {
            format = try ImageFormat(named: name)
        } catch {
            if error.isQEMUDriver { throw CLIError("Format driver '\(name)' does not support option amendment") }
            throw CLIError("Unknown file format '\(name)'")
        }
        guard let table = AmendOptions.table(for: format) else {
            throw CLIError("Format driver '\(name)' does not support option amendment")
        }
        var text = "Amend options for '\(name)':\n"
        for option in table {
            text += "  " + TextFormat.left("\(option.name)=<\(option.helpType)>", 22) + " - " + option.help + "\n"
        }
        return text
    }

    /// The options checked as QemuOpts parses them against the amend table: in command-line
    /// order, a name not in the table is "Invalid parameter" (with QEMU's hint when it is a
    /// creation option), a value not of the option's type is refused in QEMU's words.
    static func parse(_ text: String, table: [CreateOptionSpec], format: ImageFormat) throws -> [String: AmendValue] {
        var values: [String: AmendValue] = [:]
        let entries = OptionList.parse(text)
        for (name, value) in entries {
            guard let spec = table.first(where: { $0.name == name }) else {
                var message = "Invalid parameter '\(name)'"
                // QEMU parses the whole list again with the creation options added: the hint
                // only when that parse succeeds (every option known, every value of its type).
                let parsesForCreation = entries.allSatisfy { entry in
                    guard let spec = table.first(where: { $0.name == entry.name })
                            ?? AmendOptions.creationOption(entry.name, format: format) else { return false }
                    return (try? typed(entry.value, spec)) != nil
                }
                if parsesForCreation { message += "\nThis option is only supported for image creation" }
                throw CLIError(message)
            }
            values[name] = try typed(value, spec)
        }
        return values
    }

    /// `value` as option `spec`'s type, or QEMU's words for a value that is not.
    static func typed(_ value: String, _ spec: CreateOptionSpec) throws -> AmendValue {
        let name = spec.name
        switch spec.type {
        case "bool":
            switch value {
            case "on", "yes", "true", "y": return .bool(true)
            case "off", "no", "false", "n": return .bool(false)
            default: throw CLIError("Parameter '\(name)' expects 'on' or 'off'")
            }
        case "number":
            guard let number = parseNumber(value) else { throw CLIError("Parameter '\(name)' expects a number") }
            return .number(number)
        case "size":
            do {
                return .size(try Backend.parseSize(value).value)
            } catch {
                throw CLIError(SizeParser.parameterMessage(for: error, text: value, parameter: name))
            }
        default:
            return .string(value)
        }
    }

    /// QEMU's parse_option_number: strtoull with base 0 (decimal, 0x hex, 0 octal), the whole
    /// value, nothing after it.
    static func parseNumber(_ text: String) -> UInt64? {
        guard let first = text.first, first.isASCII, first.isNumber else { return nil }
        if text.hasPrefix("0x") || text.hasPrefix("0X") { return UInt64(text.dropFirst(2), radix: 16) }
        if text.count > 1 && text.hasPrefix("0") { return UInt64(text.dropFirst(), radix: 8) }
        return UInt64(text, radix: 10)
    }
}
