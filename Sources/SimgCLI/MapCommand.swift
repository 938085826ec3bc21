import DiskIO
import ImageFormats

/// `simg map [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--start-offset=OFFSET] [--max-length=LEN] [-U] filename`,
/// qemu-img map's entries and layouts: one entry per run of equal mapping down the backing
/// chain (ChainWalker.mapWalk), printed as it comes so memory stays bounded.
enum MapCommand {
    static let command = Command(
        name: "map",
        synopsis: "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename",
        details: [
            "Shows how the image's guest ranges are mapped: which layer of the backing chain holds",
            "each range (depth 0 = the image itself), whether it is allocated there (present),",
            "reads as zeros, holds data, and where it lies in that layer's file (offset).",
            "  '-f' names the format instead of probing it",
            "  '--output' is 'human' (default: the data ranges with their file and offset; refused",
            "       for compressed clusters, which have no offset) or 'json' (every range)",
            "  '--start-offset' and '--max-length' limit the ranges shown (k, M, G, T, P, E suffixes)",
            "  '-U' (force share) reads an image another process has open for writing",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, CommandSupport.forceShareOption, CommandSupport.outputOption,
                  .long("start-offset", takesValue: true), .long("max-length", takesValue: true),
                  CommandSupport.imageOptsOption, CommandSupport.objectOption],
        modifiesImages: { _ in false },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img parses these and creates each --object while it reads its options, in
        // command-line order, before anything else.
        var start: UInt64 = 0, maxLength: UInt64?
        if try CommandSupport.objects(scan, console: console, parsing: [
            "start-offset": { start = try CommandSupport.cvtnum($0, "start offset") },
            "max-length": { maxLength = try CommandSupport.cvtnum($0, "max length") },
        ]) { return 0 }
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        let output = try CommandSupport.outputFormat(scan)
        let format = try CommandSupport.format(scan, opening: filename)
        let image = try CommandSupport.open(filename, imageOpts: scan.has("image-opts"),
                                            OpenOptions(format: format, writable: false, cache: .writeback,
                                                        openBacking: true, locking: CommandSupport.readLocking(scan)),
                                            wording: .wholeChain, console: console)
        defer { try? image.close() }

        let size = image.virtualSize
        var end = size
        if let maxLength {
            // qemu-img adds them as int64_t: past INT64_MAX the sum goes negative and
            // MIN(sum, length) leaves nothing to map.
            let sum = start + maxLength  // both <= INT64_MAX: no UInt64 overflow
            end = sum > UInt64(Int64.max) ? start : min(sum, size)
        }
        var printer = Printer(output: output, console: console)
        printer.begin()
        var failure: CLIError?
        if start < end {
            let walker = ChainWalker(top: image)
            do {
                try walker.mapWalk(from: start, length: end - start) { entry in
                    if let problem = printer.add(entry) { throw problem }
                }
            } catch let error as CLIError {
                failure = error
            } catch {
                failure = CLIError("Could not read file metadata: \(error)")
            }
        }
        if failure == nil {
            // Nothing in the range (or a 0-byte image): qemu-img's one empty entry at the start.
            if printer.printed == 0 && !printer.hasPending {
                _ = printer.add(MapEntry(start: start, length: 0, depth: 0, present: false, zero: false,
                                         data: false, hostOffset: nil, layer: nil))
            }
            printer.finish()
        } else {
            printer.flush()
        }
        if let failure { throw failure }
        return 0
    }

    /// Prints entries in qemu-img's layouts. JSON needs to know whether another entry follows
    /// (`,\n` between entries), so each is held until the next arrives; output is built as
    /// bytes (ByteOutput) and written in 64 KiB pieces.
    struct Printer {
        let output: CommandSupport.OutputFormat
        private let bytes: ByteOutput
        var pending: MapEntry?
        var printed = 0
        var hasPending: Bool { pending != nil }
        /// The File column's last name and its bytes (FileName: a name that is not UTF-8 is
        /// printed as its own bytes, as qemu-img prints it); every row of a chain's layer has it.
        private var lastName: String?
        private var lastNameBytes: [UInt8] = []

        init(output: CommandSupport.OutputFormat, console: Console) {
            self.output = output
            bytes = ByteOutput(console: console)
        }

        func begin() {
            bytes.append(output == .json ? "[" : "Offset          Length          Mapped to       File\n")
        }

        /// The three flags of a JSON entry as one piece (one copy instead of three).
        static func flags(present: Bool, zero: Bool, data: Bool) -> StaticString {
            switch (present, zero, data) {
            case (false, false, false): return ", \"present\": false, \"zero\": false, \"data\": false"
            case (false, false, true): return ", \"present\": false, \"zero\": false, \"data\": true"
            case (false, true, false): return ", \"present\": false, \"zero\": true, \"data\": false"
            case (false, true, true): return ", \"present\": false, \"zero\": true, \"data\": true"
            case (true, false, false): return ", \"present\": true, \"zero\": false, \"data\": false"
            case (true, false, true): return ", \"present\": true, \"zero\": false, \"data\": true"
            case (true, true, false): return ", \"present\": true, \"zero\": true, \"data\": false"
            case (true, true, true): return ", \"present\": true, \"zero\": true, \"data\": true"
            }
        }

        /// Takes the next entry; the held one is printed. Returns human mode's refusal of a
        /// data range without an offset (compressed clusters), after the rows before it.
        mutating func add(_ entry: MapEntry) -> CLIError? {
            defer { pending = entry }
            guard let previous = pending else { return nil }
            return emit(previous, last: false)
        }

        mutating func finish() {
            if let previous = pending {
                pending = nil
                if let problem = emit(previous, last: true) {
                    flush()
                    bytes.console.error(problem.message)
                    return
                }
            }
            if output == .json { bytes.append("]\n") }
            flush()
        }

        func flush() { bytes.flush() }

        private mutating func emit(_ e: MapEntry, last: Bool) -> CLIError? {
            printed += 1
            switch output {
            case .json:
                bytes.append("{ \"start\": "); bytes.appendDecimal(e.start)
                bytes.append(", \"length\": "); bytes.appendDecimal(e.length)
                bytes.append(", \"depth\": "); bytes.appendDecimal(UInt64(e.depth))
                bytes.append(Self.flags(present: e.present, zero: e.zero, data: e.data))
                if let host = e.hostOffset { bytes.append(", \"offset\": "); bytes.appendDecimal(host) }
                bytes.append(last ? "}" : "},\n")
            case .human:
                if e.data && e.hostOffset == nil {
                    return CLIError("File contains external, encrypted or compressed clusters.")
                }
                if e.data && !e.zero, let host = e.hostOffset {
                    bytes.appendHexColumn(e.start)
                    bytes.appendHexColumn(e.length)
                    bytes.appendHexColumn(host)
                    let name = e.fileName ?? ""
                    if name != lastName {
                        lastName = name
                        lastNameBytes = FileName.bytes(of: name)
                    }
                    bytes.append(lastNameBytes)
                    bytes.append("\n")
                }
            }
            return nil
        }
    }
}
