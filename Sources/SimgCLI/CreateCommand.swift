import DiskIO
import ImageFormats

/// `simg create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]`
enum CreateCommand {
    static let command = Command(
        name: "create",
        synopsis: "create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]",
        details: [
            "Creates a new disk image 'filename' of 'size' bytes (format 'fmt', raw by default).",
            "  'size' takes the suffixes k, M, G, T, P, E (powers of 1024); it may be left out",
            "    when a backing file gives the size",
            "  '-b' makes 'backing_file' the image's backing file, '-F' names its format",
            "  '-u' creates the image without opening the backing file",
            "  '-o' takes format options as name=value[,name=value...] (',,' is a literal comma);",
            "    '-o help' lists the format's options",
            "  '-q' does not print the \"Formatting ...\" line",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg creates no encrypted images",
        ],
        options: [CommandSupport.formatOption, .value("b", "backing"), .value("F", "backing-format"),
                  .flag("u", "unsafe"), .value("o", "options"), CommandSupport.objectOption],
        modifiesImages: { _ in true },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img checks each -o list and creates each --object while it reads its options,
        // in command-line order.
        if try CommandSupport.objects(scan, console: console, parsing: ["options": { _ = try OptionList.join([$0]) }]) {
            return 0
        }
        let formatName = scan.last("format") ?? "raw"
        let options = try OptionList.join(scan.values("options"))
        let filename = scan.operands.first

        if let options, OptionList.wantsHelp(options) {
            let format = try CommandSupport.creatableFormat(formatName)
            console.out(optionHelp(for: format, filename: filename))
            return 0
        }
        guard let filename else { throw CLIError.usage("Expecting image file name") }

        var size: UInt64?
        if scan.operands.count > 1 {
            size = try parseSize(scan.operands[1], console: console)
        }
        if scan.operands.count > 2 {
            throw CLIError.usage("Unexpected argument: \(scan.operands[2])")
        }
        let format = try CommandSupport.creatableFormat(formatName, prefix: "\(filename): ")

        let request = CreateRequest(
            format: format, path: filename, size: size,
            options: options.map(OptionList.parse) ?? [],
            backingFile: scan.last("backing"), backingFormat: scan.last("backing-format"),
            unsafeBacking: scan.has("unsafe"))
        let quiet = scan.has("quiet")
        do {
            try Backend.create(request, announce: { line in
                if !quiet { console.out(line.hasSuffix("\n") ? line : line + "\n") }
            }, warn: { console.error("warning: " + $0) })
        } catch let error as ImageError where error.path == filename {
            // qemu-img names the new image without quotes: "x.qcow2: Invalid parameter 'foo'",
            // and a failed open(2) is just "x: Could not create 'x': strerror".
            if let io = error.cause as? IOError, io.operation == .create {
                throw CLIError("\(filename): \(io)")
            }
            // Another process has the file open: qemu-img says only its lock error (which
            // names the file in use in its hint), and the file is left untouched.
            if let lock = error.cause as? ImageLockError {
                throw CLIError("\(filename): \(lock)")
            }
            var message = "\(filename): \(error.message)"
            if let cause = error.cause { message += ": \(cause)" }
            throw CLIError(message)
        } catch let io as IOError where io.operation == .create {
            throw CLIError("\(filename): \(io)")
        }
        return 0
    }

    /// qemu-img's two error messages for a size: out of range, or not a size at all.
    static func parseSize(_ text: String, console: Console) throws(CLIError) -> UInt64 {
        let size: UInt64
        do {
            let parsed = try Backend.parseSize(text)
            if parsed.hexSuffix { console.error("warning: " + SizeParser.hexSuffixWarning(text)) }
            size = parsed.value
        } catch .outOfRange {
            throw CLIError(sizeRangeMessage)
        } catch {
            throw CLIError(badSizeMessage)
        }
        guard size <= UInt64(Int64.max) else { throw CLIError(sizeRangeMessage) }
        return size
    }

    /// qemu-img reports a bad size as two errors, so the second line carries the prefix too.
    static let badSizeMessage = """
        Invalid image size specified. You may use k, M, G, T, P or E suffixes for
        simg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.
        """
    static let sizeRangeMessage = "Invalid image size specified. Must be between 0 and \(Int64.max)."

    /// `-o help`, laid out like qemu-img's: "  name=<type>" padded to 22 columns, " - ", help.
    /// With a file name qemu-img also lists its file protocol's options under one heading;
    /// without, it lists the format's and says the protocol may have more.
    /// A file name that leads to a device lists host_device's options instead of the file's.
    static func optionHelp(for format: ImageFormat, filename: String?) -> String {
        let withFilename = filename != nil
        let specs = Backend.optionSpecs(for: format, includeProtocol: withFilename,
                                        protocol: filename.map { CreateProtocol(path: $0) } ?? .file)
        var text = withFilename ? "Supported options:\n" : "Supported \(format.rawValue) options:\n"
        for option in specs.sorted(by: { $0.name < $1.name }) {
            text += "  " + TextFormat.left("\(option.name)=<\(option.helpType)>", 22) + " - " + option.help + "\n"
        }
        if !withFilename {
            text += "\nThe protocol level may support further options.\n"
            text += "Specify the target filename to include those options.\n"
        }
        return text
    }
}
