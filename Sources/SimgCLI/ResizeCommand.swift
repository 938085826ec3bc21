import DiskIO
import ImageFormats

/// `simg resize [--object objectdef] [--image-opts] [-q] [-f fmt] [--preallocation=PREALLOC] [--shrink] filename [+|-]size` with
/// qemu-img 7.2's contract. As in qemu-img the size is the last argument, taken before the
/// options are scanned (`Command.lastArgumentIsOperand`), so `-1G` is a size, not an option.
/// qemu-img resize takes no `-U`.
enum ResizeCommand {
    static let command = Command(
        name: "resize",
        synopsis: "resize [--object objectdef] [--image-opts] [-q] [-f fmt] [--preallocation=PREALLOC] [--shrink] filename [+ | -]size",
        details: [
            "Changes the disk image as if it had been created with that size.",
            "  'size' is the new size, or with '+' or '-' the change (k, M, G, T, P or E suffixes);",
            "         it is always the last argument, so '-1G' works",
            "  '--shrink' is required to make an image smaller (data past the new end is lost)",
            "  '--preallocation' (off, falloc, full; qcow2 also metadata) only when growing",
            "  '-f' names the image's format instead of probing it",
            "  '-q' prints nothing but errors",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, .long("preallocation", takesValue: true), .long("shrink"),
                  CommandSupport.objectOption, CommandSupport.imageOptsOption],
        lastArgumentIsOperand: true,
        modifiesImages: { _ in true },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img parses --preallocation and creates each --object while it reads its
        // options, in command-line order.
        var preallocation = ResizePreallocation.off
        if try CommandSupport.objects(scan, console: console, parsing: ["preallocation": { name in
            guard let mode = ResizePreallocation(rawValue: name) else {
                throw CLIError("Invalid preallocation mode '\(name)'")
            }
            preallocation = mode
        }]) { return 0 }
        // The size was taken off the end before scanning: exactly one file name must remain.
        guard scan.operands.count == 2 else { throw CLIError.usage("Expecting image file name and size") }
        let filename = scan.operands[0]
        var sizeText = Substring(scan.operands[1])
        var sign: Int64 = 0
        if sizeText.first == "+" { sign = 1; sizeText = sizeText.dropFirst() }
        else if sizeText.first == "-" { sign = -1; sizeText = sizeText.dropFirst() }
        let amount: UInt64
        do {
            let parsed = try Backend.parseSize(String(sizeText))
            if parsed.hexSuffix { console.error("warning: " + SizeParser.hexSuffixWarning(String(sizeText))) }
            amount = parsed.value
        } catch {
            throw CLIError(SizeParser.parameterMessage(for: error, text: String(sizeText), parameter: "size"))
        }
        let format = try CommandSupport.format(scan, opening: filename)
        let imageOpts = scan.has("image-opts")
        let name = try CommandSupport.imageName(filename, imageOpts: imageOpts, console: console)
        let image = try CommandSupport.open(name, shown: filename,
                                            OpenOptions(format: format, writable: true, cache: .writeback, openBacking: true),
                                            wording: .wholeChain, console: console)
        defer { try? image.close() }
        guard let resizable = image as? any ResizableImage else {
            throw CLIError("Image format driver does not support resize")
        }
        CommandSupport.warnIfProbedForWriting(image, name: name, written: filename, imageOpts: imageOpts,
                                              format: format, console: console)
        // qemu-img's int64 arithmetic (blk_getlength + n * relative), wrapping as C does.
        let current = Int64(bitPattern: image.virtualSize)
        let n = Int64(bitPattern: amount)
        let total = sign == 0 ? n : current &+ (n &* sign)
        guard total > 0 else { throw CLIError("New image size must be positive") }
        if total <= current && preallocation != .off {
            throw CLIError("Preallocation can only be used for growing images")
        }
        if total < current && !scan.has("shrink") {
            console.error("Use the --shrink option to perform a shrink operation.")
            console.error("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.")
            return 1
        }
        var resized = false
        do {
            try resizable.resize(to: UInt64(total), preallocation: preallocation)
            resized = true
            try image.flush()
            // Closing stores what the format keeps until then (qcow2's persistent bitmaps).
            try CommandSupport.closeFinished(image)
        } catch let error as InterruptedError where resized {
            // The new size is on disk; only the frees after it were left out.
            throw error.naming(filename, outcome: "was resized (clusters it no longer uses may be leaked)")
        } catch let error as ResizeError {
            throw CLIError(error.message)
        } catch let error as InterruptedError {
            // The format names the image itself once the new state is written; before that
            // the size is the old one (a shrink may already have dropped what lies past the new end).
            throw error.naming(filename, outcome: total < current
                               ? "was not resized (its size is unchanged; data past the new end may be gone)"
                               : "was not resized (its size is unchanged)")
        }
        if !scan.has("quiet") { console.out("Image resized.\n") }
        return 0
    }
}
