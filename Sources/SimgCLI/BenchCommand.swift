import DiskIO
import ImageFormats
import Pipeline

/// `simg bench`: qemu-img bench's options, messages, request pattern and output lines, run by
/// Pipeline's BenchRunner on simg's engines.
enum BenchCommand {
    static let command = Command(
        name: "bench",
        synopsis: "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [--no-drain] [-i aio] [-n] "
            + "[-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] [--image-opts] filename",
        details: [
            "Runs a simple I/O benchmark on 'filename', as qemu-img bench: 'count' requests (default",
            "75000) of 'buffer_size' bytes (default 4096), 'depth' in flight (default 64), the first at",
            "'offset' (default 0), each next one 'step_size' further (default: the buffer size),",
            "wrapping at the end of the image. Reads by default, writes of the byte 'pattern' (default",
            "0) with '-w'; '--flush-interval' flushes every that many write requests (after draining",
            "the queue, unless '--no-drain'). Reads and writes go through the image's format (a",
            "qcow2's guest view; its metadata stays consistent).",
            "  '-t' cache mode (none, writeback (default), writethrough, directsync, unsafe)",
            "  '-n' or '-i native': Linux AIO, which needs O_DIRECT ('-t none' or '-t directsync');",
            "       '-i threads' (default) and '-i io_uring' use simg's thread pool",
            "  '-U' (force share) reads an image another process has open for writing (not with '-w')",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  Unlike qemu-img, '-d 0' (with requests to send) is refused instead of hanging, at most",
            "  1024 requests are in flight, and a request size larger than the image fails at once",
            "  instead of allocating depth x size bytes first ('-c 1 -s 2147483647' aborts qemu-img).",
        ],
        options: [
            .value("c", "count"), .value("d", "depth"), CommandSupport.formatOption, .flag("n", "native"),
            .value("i", "aio"), .value("o", "offset"), .value("s", "buffer-size"), .value("S", "step-size"),
            .value("t", "cache"), .flag("w", "write"), CommandSupport.forceShareOption,
            .long("flush-interval", takesValue: true), .long("pattern", takesValue: true), .long("no-drain"),
            CommandSupport.imageOptsOption,
        ],
        modifiesImages: { $0.has("write") },
        run: run)

    /// qemu_strtoul (base 0: `0x` hex, leading `0` octal; white space and one sign first; the
    /// whole text; a negative number wraps, as strtoul's) at most `limit`, else nil.
    static func strtoul(_ text: String, limit: UInt64) -> UInt64? {
        var bytes = Substring(text).utf8[...]
        while let first = bytes.first, first == 32 || (9...13).contains(first) { bytes = bytes.dropFirst() }
        var negative = false
        if let sign = bytes.first, sign == UInt8(ascii: "+") || sign == UInt8(ascii: "-") {
            negative = sign == UInt8(ascii: "-")
            bytes = bytes.dropFirst()
        }
        var base: UInt64 = 10
        if bytes.starts(with: "0x".utf8) || bytes.starts(with: "0X".utf8),
           bytes.count > 2, hexValue(bytes[bytes.index(bytes.startIndex, offsetBy: 2)]) != nil {
            base = 16
            bytes = bytes.dropFirst(2)
        } else if bytes.first == UInt8(ascii: "0") {
            base = 8
        }
        guard !bytes.isEmpty else { return nil }
        var value: UInt64 = 0
        for byte in bytes {
            guard let digit = hexValue(byte), digit < base else { return nil }
            let (m, o1) = value.multipliedReportingOverflow(by: base)
            let (sum, o2) = m.addingReportingOverflow(digit)
            if o1 || o2 { return nil }  // ERANGE
            value = sum
        }
        if negative && value != 0 { value = 0 &- value }
        return value <= limit ? value : nil
    }

    private static func hexValue(_ byte: UInt8) -> UInt64? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): UInt64(byte - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): UInt64(byte - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): UInt64(byte - UInt8(ascii: "A") + 10)
        default: nil
        }
    }

    /// cvtnum_full(NAME, text, 0, INT_MAX).
    static func intSize(_ text: String, _ what: String) throws(CLIError) -> Int {
        let range = CLIError("Invalid \(what) specified. Must be between 0 and \(Int32.max).")
        let value: UInt64
        do {
            value = try SizeParser.parse(text)
        } catch SizeParser.Error.outOfRange {
            throw range
        } catch {
            throw CLIError("Invalid \(what) specified. You may use k, M, G, T, P or E suffixes for\n"
                           + "simg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        }
        guard value <= UInt64(Int32.max) else { throw range }
        return Int(value)
    }

    struct Settings {
        var options = BenchOptions()
        var cache = CacheMode.writeback
        var native = false
    }

    /// The options in command-line order, each checked as qemu-img's getopt loop checks it.
    static func parse(_ scan: ScanResult) throws(CLIError) -> Settings {
        var settings = Settings()
        var step = 0
        let intMax = UInt64(Int32.max)
        for option in scan.options {
            let value = option.value ?? ""
            switch option.key {
            case "count":
                guard let n = strtoul(value, limit: intMax) else { throw CLIError("Invalid request count specified") }
                settings.options.count = Int(n)
            case "depth":
                guard let n = strtoul(value, limit: intMax) else { throw CLIError("Invalid queue depth specified") }
                settings.options.depth = Int(n)
            case "native": settings.native = true
            case "aio":
                switch value {
                case "native": settings.native = true
                case "threads", "io_uring": break
                default: throw CLIError("Invalid aio option: \(value)")
                }
            case "offset":
                do { settings.options.offset = try CommandSupport.cvtnum(value, "offset") } catch let error as CLIError {
                    throw error
                } catch {
                    throw CLIError("Invalid offset specified.")
                }
            case "buffer-size": settings.options.size = try intSize(value, "buffer size")
            case "step-size": step = try intSize(value, "step_size")
            case "cache":
                guard let mode = CacheMode(name: value) else { throw CLIError("Invalid cache mode") }
                settings.cache = mode
            case "write": settings.options.write = true
            case "pattern":
                guard let n = strtoul(value, limit: 0xff) else { throw CLIError("Invalid pattern byte specified") }
                settings.options.pattern = UInt8(n)
            case "flush-interval":
                guard let n = strtoul(value, limit: intMax) else { throw CLIError("Invalid flush interval specified") }
                settings.options.flushInterval = Int(n)
            case "no-drain": settings.options.drainOnFlush = false
            default: break
            }
        }
        settings.options.step = step == 0 ? settings.options.size : step
        settings.options.engine = settings.native ? .native : .threads
        return settings
    }

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        let settings = try parse(scan)
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        let options = settings.options
        if !options.write && options.flushInterval > 0 {
            throw CLIError("--flush-interval is only available in write tests")
        }
        if options.flushInterval > 0 && options.flushInterval < options.depth {
            throw CLIError("Flush interval can't be smaller than depth")
        }
        // qemu-img 7.2 waits forever here: no request is ever sent.
        if options.depth == 0 && options.count > 0 {
            throw CLIError("Invalid queue depth specified: requests need a depth of at least 1")
        }
        // qemu-img's img_open refuses -f with --image-opts before it opens anything.
        if scan.has("image-opts") { _ = try CommandSupport.format(scan, opening: filename) }
        let forceShare = CommandSupport.forceShare(scan)
        if forceShare && options.write {
            throw CLIError("Could not open '\(filename)': force-share=on can only be used with read-only images")
        }
        if settings.native && !settings.cache.direct {
            throw CLIError("Could not open '\(filename)': aio=native was specified, but it requires cache.direct=on, which was not specified.")
        }
        let format = try CommandSupport.format(scan, opening: filename)
        let imageOpts = scan.has("image-opts")
        let name = try CommandSupport.imageName(filename, imageOpts: imageOpts, console: console)
        let image = try CommandSupport.open(name, shown: filename,
                                            OpenOptions(format: format, writable: options.write, cache: settings.cache,
                                                        openBacking: true,
                                                        locking: options.write ? .standard : CommandSupport.readLocking(scan)),
                                            wording: .wholeChain, console: console)
        defer { try? image.close() }
        if options.write {
            CommandSupport.warnIfProbedForWriting(image, name: name, written: filename, imageOpts: imageOpts,
                                                  format: format, console: console)
        }
        // qemu-img prints these even with -q.
        console.out("Sending \(options.count) \(options.write ? "write" : "read") requests, \(options.size) bytes each, "
                    + "\(options.depth) in parallel (starting at offset \(options.offset), step size \(options.step))\n")
        if options.flushInterval > 0 { console.out("Sending flush every \(options.flushInterval) requests\n") }
        let seconds: Double
        do {
            let runner = try BenchRunner(image: image, options: options)
            seconds = try runner.run()
        } catch let error as AllocationError {
            throw CLIError("Could not allocate the request buffers: \(error)")
        } catch let error as BenchRequestError {
            throw CLIError(error.description)
        } catch let error as ThreadStartError {
            throw CLIError("Could not start the benchmark: \(error)")
        }
        console.out("Run completed in \(threeDecimals(seconds)) seconds.\n")
        if options.write { try CommandSupport.closeFinished(image) }
        return 0
    }

    /// printf's "%3.3f" for a duration (never negative).
    static func threeDecimals(_ seconds: Double) -> String {
        let millis = UInt64((max(seconds, 0) * 1000).rounded())
        let fraction = millis % 1000
        return "\(millis / 1000)." + (fraction < 10 ? "00" : fraction < 100 ? "0" : "") + "\(fraction)"
    }
}
