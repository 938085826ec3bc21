import DiskIO
import Glibc
import ImageFormats
import Pipeline

/// `simg compare [--object objectdef] [--image-opts] [-q] [-p] [-s] [-f fmt] [-F fmt] [-T src_cache] [-U] filename1 filename2`, as
/// qemu-img 7.2's img_compare: the same verdict lines and offsets, the size-mismatch warning,
/// strict mode, progress, and its exit statuses (0 identical, 1 different, 2 an error after
/// the options were read, 3 a block-status failure, 4 a read failure; usage mistakes 1). The
/// loop itself is ComparePipeline's (block status guided, parallel reads).
enum CompareCommand {
    static let command = Command(
        name: "compare",
        synopsis: "compare [--object objectdef] [--image-opts] [-q] [-f fmt] [-F fmt] [-T src_cache] [-p] [-s] [-U] filename1 filename2",
        details: [
            "Compares what two images read as (each with its backing chain), whatever their formats.",
            "Prints 'Images are identical.' (exit 0) or 'Content mismatch at offset N!' (exit 1), N the",
            "start of the first differing 512-byte piece counted from the start of the range being",
            "compared (ranges end where either image's allocation changes, so N can be unaligned).",
            "Images of different sizes are identical when the larger one's extra part reads as zeros",
            "('Warning: Image size mismatch!' first). Exit 2: an image could not be opened or an option",
            "is wrong; 3: block status failed; 4: reading failed.",
            "  '-f' and '-F' name the formats of the first and second image instead of probing them",
            "  '-T' is the cache mode of both (default writeback)",
            "  '-s' strict: sizes must match and so must the allocation (qemu-img's block status",
            "       words, including its end-of-file bit) at every range",
            "  '-p' shows progress (qemu-img's meter, 2 % steps); '-q' prints nothing (only the exit",
            "       status tells); '--progress=json' JSON lines on stderr, phase \"compare\" (see README)",
            "  '-U' (force share) reads images another process has open for writing",
            "  '--image-opts': the filenames are option lists (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, .value("F", "second-format"), .value("T", "source-cache"),
                  .flag("s", "strict"), CommandSupport.forceShareOption,
                  CommandSupport.imageOptsOption, CommandSupport.objectOption] + Progress.optionSpecs,
        modifiesImages: { _ in false },
        run: run)

    /// Reader threads (each with its own open of both images): every core, at least two.
    static var workers: Int { max(2, min(8, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))) }

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img creates each --object while it reads its options, before the operand
        // check; a bad one is exit 2 there too.
        do {
            if try CommandSupport.objects(scan, console: console) { return 0 }
        } catch let error as CLIError {
            console.error(error.message)
            return 2
        }
        let quiet = scan.has("quiet")
        guard scan.operands.count == 2 else { throw CLIError.usage("Expecting two image file names") }
        let names = scan.operands
        // qemu-img starts its progress meter here (2 % steps): whatever fails after, it ends
        // the line.
        let progress = try Progress.make(scan, minSkip: 2, console: console)
        defer { progress.end() }
        do {
            return try compare(names, scan, console, quiet: quiet, progress: progress)
        } catch let error as CLIError {
            // Past the options every failure is exit 2, the --help hint never added.
            console.error(error.message)
            return 2
        }
    }

    private static func compare(_ names: [String], _ scan: ScanResult, _ console: Console, quiet: Bool,
                                progress: Progress) throws -> Int32 {
        let cache = try CommandSupport.cacheMode(scan, "source-cache", default: .writeback, source: true)
        var opened: [any DiskImage] = []
        defer { for image in opened { try? image.close() } }
        var sides: [CompareSide] = []
        // With --image-opts each list is opened (here and by the readers) by its json: name;
        // messages quote the list as written, as qemu-img's do.
        var openNames: [String] = []
        for (index, name) in names.enumerated() {
            let format = try CommandSupport.format(scan, index == 0 ? "format" : "second-format", opening: name)
            let options = OpenOptions(format: format, writable: false, cache: cache, openBacking: true,
                                      locking: CommandSupport.readLocking(scan))
            openNames.append(try CommandSupport.imageName(name, imageOpts: scan.has("image-opts"), console: console))
            let image = try CommandSupport.open(openNames[index], shown: name, options, wording: .wholeChain,
                                                console: console)
            opened.append(image)
            sides.append(CompareSide(image: image, name: name, readers: []))
        }
        // The readers: the same images opened again, without locks of their own (the first
        // open holds QEMU's); a failure now is as good as one of the first open.
        for index in 0..<2 {
            let options = OpenOptions(format: sides[index].image.format, writable: false, cache: cache,
                                      openBacking: true, locking: .forceShare)
            for _ in 0..<workers {
                let reader: any DiskImage
                do {
                    reader = try ImageOpener.open(openNames[index], options: options)
                } catch {
                    throw CLIError(CommandSupport.openFailure(error, path: openNames[index], shown: names[index],
                                                              wording: .wholeChain))
                }
                opened.append(reader)
                sides[index].readers.append(reader)
            }
        }

        let base = max(sides[0].image.virtualSize, sides[1].image.virtualSize)
        progress.meter(0, max: 100)
        progress.bytes("compare", done: 0, total: base)
        var compared: UInt64 = 0
        let pipeline = try ComparePipeline(first: sides[0], second: sides[1], strict: scan.has("strict"))
        let say: (String) -> Void = { if !quiet { console.out($0 + "\n") } }
        let verdict: CompareVerdict
        do {
            verdict = try pipeline.run { event in
                switch event {
                case .advanced(let bytes):
                    // qemu_progress_print(((float)chunk / progress_base) * 100, 100), in float.
                    progress.meter(bytes == 0 ? 0 : Float(bytes) / Float(base) * 100, max: 100)
                    compared += bytes
                    progress.bytes("compare", done: compared, total: base)
                case .sizeMismatch: say("Warning: Image size mismatch!")
                }
            }
        } catch CompareError.blockStatus(let side, _) {
            console.error("Sector allocation test failed for \(names[side])")
            return 3
        } catch CompareError.read(let side, let offset, let cause) {
            console.error("Error while reading offset \(offset) of \(names[side]): \(reason(cause))")
            return 4
        }
        switch verdict {
        case .identical:
            progress.finish("compare", total: base)
            say("Images are identical.")
            return 0
        case .contentMismatch(let offset):
            say("Content mismatch at offset \(offset)!")
        case .strictSizeMismatch:
            say("Strict mode: Image size mismatch!")
        case .strictStatusMismatch(let offset):
            say("Strict mode: Offset \(offset) block status mismatch!")
        }
        return 1
    }

    /// strerror of the failure as QEMU would return it: the system call's errno, else EIO
    /// (what QEMU's drivers return for data they cannot decode).
    static func reason(_ error: any Error) -> String {
        var current = error
        while true {
            if let io = current as? IOError, io.code != 0 { return IOError.describe(errno: io.code) }
            guard let image = current as? ImageError, let cause = image.cause else { break }
            current = cause
        }
        return IOError.describe(errno: EIO)
    }
}
