import DiskIO
import Glibc
import ImageFormats
import Pipeline

/// `simg dd [--object objectdef] [--image-opts] [-U] [-f fmt] [-O fmt] [bs=N] [count=N] [skip=N] if=IN of=OUT`: qemu-img dd's
/// operands, messages and output size, copied through convert's pipeline over a window of the
/// input (ConvertPlanner's `window`): many large requests in flight instead of one `bs` block
/// at a time, and zero ranges left unwritten on the fresh output (which reads as zeros there).
enum DdCommand {
    static let command = Command(
        name: "dd",
        synopsis: "dd [--object objectdef] [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output",
        details: [
            "Copies part of 'input' (any format, with its backing chain) into a new image 'output'",
            "in format 'output_fmt' (raw by default), created fresh with that format's defaults",
            "(an existing file is replaced; a device is written over, never truncated).",
            "  'bs' block size in bytes (default 512, 1 to 2147483647; k, M, G, T, P, E suffixes)",
            "  'skip' blocks of 'bs' skipped at the start of the input",
            "  'count' limits the copy to the input's first count*bs bytes. As in qemu-img, count",
            "       counts from the START of the input, not from 'skip': bs=1k skip=3 count=7 copies",
            "       input bytes 3k..7k (4 KiB), not 7 KiB. A skip past that end prints a warning and",
            "       leaves an empty output (exit 0)",
            "  The output's size is what is copied, rounded up to 512 bytes (the rest reads as zeros).",
            "  Unlike qemu-img, ranges that read as zeros are not written (the fresh output reads as",
            "  zeros there): a raw output stays sparse, a qcow2 output leaves them unallocated. The",
            "  guest content is byte for byte qemu-img's",
            "  '-U' (force share) reads an input another process has open for writing",
            "  '--image-opts': 'input' is an option list (if=driver=qcow2,file.filename=disk.qcow2);",
            "       'output' stays a file name, as in qemu-img",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.forceShareOption, CommandSupport.formatOption, .value("O", "output-format"),
                  CommandSupport.imageOptsOption, CommandSupport.objectOption],
        modifiesImages: { _ in true },
        run: run)

    /// The operands given (the last of each name wins, as in qemu-img).
    struct Operands {
        var blockSize: UInt64 = 512
        var count: UInt64?
        var skip: UInt64?
        var input: String?
        var output: String?
    }

    /// qemu-img's img_dd operand loop: NAME=VALUE each, checked in command-line order.
    static func parseOperands(_ words: [String]) throws(CLIError) -> Operands {
        var result = Operands()
        for word in words {
            guard let equals = word.firstIndex(of: "=") else { throw CLIError("unrecognized operand \(word)") }
            let name = String(word[..<equals])
            let value = String(word[word.index(after: equals)...])
            switch name {
            case "bs":
                // cvtnum_full("bs", arg, 1, INT_MAX)
                let parsed: UInt64
                do {
                    parsed = try SizeParser.parse(value)
                } catch SizeParser.Error.outOfRange {
                    throw CLIError("Invalid bs specified. Must be between 1 and \(Int32.max).")
                } catch {
                    throw suffixError("bs")
                }
                guard parsed >= 1 && parsed <= UInt64(Int32.max) else {
                    throw CLIError("Invalid bs specified. Must be between 1 and \(Int32.max).")
                }
                result.blockSize = parsed
            case "count": result.count = try number(value, "count")
            case "skip": result.skip = try number(value, "skip")
            case "if": result.input = value
            case "of": result.output = value
            default: throw CLIError("unrecognized operand \(name)")
            }
        }
        return result
    }

    private static func number(_ text: String, _ what: String) throws(CLIError) -> UInt64 {
        do { return try CommandSupport.cvtnum(text, what) } catch let error as CLIError { throw error } catch {
            throw suffixError(what)
        }
    }

    private static func suffixError(_ what: String) -> CLIError {
        CLIError("Invalid \(what) specified. You may use k, M, G, T, P or E suffixes for\n"
                 + "simg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    }

    /// The range of the input copied: qemu-img's size rule. The end is the input's size, or
    /// count*bs when that is smaller (counted from the start of the input); the start is
    /// skip*bs, or the end when that lies past it (`skipsPastEnd`: qemu-img's warning).
    static func window(size: UInt64, _ operands: Operands) -> (range: Range<UInt64>, skipsPastEnd: Bool) {
        let bs = operands.blockSize
        var end = size
        // qemu-img: count <= INT64_MAX / bs && count * bs < size (no overflow).
        if let count = operands.count, count <= UInt64(Int64.max) / bs, count * bs < end { end = count * bs }
        if let skip = operands.skip {
            if skip > UInt64(Int64.max) / bs || skip * bs > end { return (end..<end, true) }
            return ((skip * bs)..<end, false)
        }
        return (0..<end, false)
    }

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img creates each --object while it reads its options: before the operands.
        if try CommandSupport.objects(scan, console: console) { return 0 }
        let operands = try parseOperands(scan.operands)
        guard let inputPath = operands.input, let outputPath = operands.output else {
            throw CLIError("Must specify both input and output files")
        }
        let inputFormat = try CommandSupport.format(scan, opening: inputPath)
        // qemu-img opens the input with its backing chain as one block graph, before it looks
        // at -O.
        let input = try CommandSupport.open(inputPath, imageOpts: scan.has("image-opts"),
                                            OpenOptions(format: inputFormat, writable: false, cache: .writeback,
                                                        locking: CommandSupport.readLocking(scan)),
                                            wording: .wholeChain, console: console)
        defer { try? input.close() }
        let outputFormat: ImageFormat
        do {
            outputFormat = try ImageFormat(named: scan.last("output-format") ?? "raw", creating: true)
        } catch {
            // qemu-img dd names no format here (convert and create do).
            throw CLIError(error.kind == .unknownFileFormat ? "Unknown file format" : "\(error)")
        }
        if let proto = ImageName.protocolName(of: outputPath), proto == "json" || (try? ImageName.parse(outputPath)) == nil {
            throw CLIError(proto == "json" ? "Unknown protocol 'json'" : Backend.nameProblem(outputPath))
        }
        let (range, skipsPastEnd) = window(size: input.virtualSize, operands)

        // qemu-img 7.2 creates the output over the input when they are one file (`if=a of=a`)
        // and so destroys it, then copies zeros; simg refuses before touching it, as convert.
        let lock = "Failed to get \"write\" lock\nIs another process using the image [\(outputPath)]?"
        let creating = "\(outputPath): error while creating output image: "
        if ConvertCommand.isInUse(outputPath, by: [input]) { throw CLIError(creating + lock) }

        let request = CreateRequest(format: outputFormat, path: outputPath, size: range.upperBound - range.lowerBound)
        do {
            try Backend.create(request, announce: { _ in }, warn: { console.error("warning: " + $0) })
        } catch let error as ImageError where error.path == outputPath {
            if let lock = error.cause as? ImageLockError { throw CLIError(creating + "\(lock)") }
            if let io = error.cause as? IOError, io.operation == .create { throw CLIError(creating + "\(io)") }
            var message = creating + error.message
            if let cause = error.cause { message += ": \(cause)" }
            throw CLIError(message)
        } catch let io as IOError {
            throw CLIError(creating + "\(io)")
        }

        // The output is opened with its format named, as qemu-img does (no probing warning).
        let target = try ConvertCommand.openTarget(outputPath, format: outputFormat, cache: .writeback,
                                                   startsZeroed: true, assumeZero: false, compress: false,
                                                   sparse: 4096)
        if skipsPastEnd { console.error("\(inputPath): cannot skip to specified offset") }
        var options = ConvertOptions()
        options.sourceWindow = range
        do {
            let pipeline: ConvertPipeline
            do {
                pipeline = try ConvertPipeline(sources: [input], target: target, options: options)
            } catch {
                target.abandon()
                throw error
            }
            try pipeline.run()
        } catch let error as ConvertError {
            throw CLIError(describe(error))
        }
        return 0
    }

    /// qemu-img dd's words for a failed copy: the operation and strerror, no file or offset.
    /// Damage found in the image (a compressed cluster that does not decompress) is EIO to
    /// QEMU's block layer, so it reads "Input/output error" as there.
    static func describe(_ error: ConvertError) -> String {
        let code = ConvertError.rootIOError(error.cause)?.code ?? EIO
        let reason = IOError.describe(errno: code)
        switch error.operation {
        case .reading: return "error while reading from input image file: \(reason)"
        case .writing: return "error while writing to output image file: \(reason)"
        case .flushing: return "\(error)"
        }
    }
}
