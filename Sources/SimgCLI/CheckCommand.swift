import DiskIO
import Glibc
import ImageFormats

/// `simg check [--object objectdef] [--image-opts] [-q] [-p] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename`
/// with qemu-img check's contract: exit 0 clean, 1 check failed, 2 corruptions, 3 leaks only,
/// 63 no check for the format; after a repair the status describes the repaired image.
enum CheckCommand {
    static let command = Command(
        name: "check",
        synopsis: "check [--object objectdef] [--image-opts] [-q] [-p] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename",
        details: [
            "Checks an image for consistency; qcow2 images can also be repaired.",
            "  '-f' names the format instead of probing it",
            "  '--output' is 'human' (default) or 'json', the same fields as qemu-img's",
            "  '-r leaks' frees leaked clusters; '-r all' also repairs corruptions",
            "  '-T' is the cache mode used to read the image (accepted as qemu-img does)",
            "  '-U' (force share) checks an image another process has open for writing (no -r)",
            "  '-q' prints no summary: only the exit status tells the result",
            "  '-p' (simg's own; qemu-img check has none) shows qemu-img's meter while the image is",
            "       checked and repaired: 0 % before, 100 % after (no steps between); '--progress=json'",
            "       JSON lines on stderr, phase \"check\" or with -r \"repair\" (see README)",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, .value("r", "repair"), .value("T", "cache"),
                  CommandSupport.forceShareOption, CommandSupport.outputOption,
                  CommandSupport.imageOptsOption, CommandSupport.objectOption] + Progress.optionSpecs,
        modifiesImages: { $0.has("repair") },
        run: run)


    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img parses -r and creates each --object while it reads its options, in
        // command-line order, before the operand checks.
        var repair = CheckRepair.none
        if try CommandSupport.objects(scan, console: console, parsing: ["repair": { value in
            switch value {
            case "leaks": repair = .leaks
            case "all": repair = .all
            default: throw CLIError.usage("Unknown option value for -r (expecting 'leaks' or 'all'): \(value)")
            }
        }]) { return 0 }
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        let output = try CommandSupport.outputFormat(scan)
        try Progress.checkFormat(scan)
        // Accepted and checked as qemu-img does; check reads through the page cache whatever it is.
        _ = try CommandSupport.cacheMode(scan, "cache", default: .writeback, source: true)
        let format = try CommandSupport.format(scan, opening: filename)
        let quiet = scan.has("quiet")
        let forceShare = CommandSupport.forceShare(scan)
        if forceShare && repair != .none {
            // qemu-img opens for repair read-write, which force share cannot be.
            throw CLIError("Could not open '\(filename)': force-share=on can only be used with read-only images")
        }
        // The image stays open (holding QEMU's locks: a writer's for -r, as qemu-img check -r
        // takes) until the check and any repair are done; the checker reads and repairs
        // through a reopen of the locked file (the same inode whatever the name leads to now),
        // a descriptor of its own, which takes no locks and so cannot conflict.
        // With --image-opts the list is opened by its json: name; messages and the JSON
        // "filename" quote the list, as qemu-img's do.
        let name = try CommandSupport.imageName(filename, imageOpts: scan.has("image-opts"), console: console)
        let (opened, holder) = try openFormat(path: name, shown: filename, format: format,
                                              locking: repair != .none ? .writer : forceShare ? .forceShare : .standard,
                                              console: console)
        defer { holder.close() }
        guard ImageChecker.supportsCheck(opened) else {
            console.error("This image format does not support checks")
            return 63
        }
        // simg's extension: the meter around the check and repair (the checker reports no
        // steps), ended before the summary so that starts on a line of its own.
        // qemu-img check has no meter: SIGUSR1 keeps its default disposition there.
        let progress = try Progress.make(scan, minSkip: 1, console: console, onRequest: false)
        let phase = repair == .none ? "check" : "repair"
        progress.meter(0, max: 100)
        progress.bytes(phase, done: 0, total: 1)
        var progressEnded = false
        let endProgress = {
            if progressEnded { return }
            progressEnded = true
            progress.end()
        }
        defer { endProgress() }
        let report: (String) -> Void = { console.err($0) }
        let reportError: (String) -> Void = { console.error($0) }

        var result: ImageCheckResult
        var failure: Int32?
        do {
            result = try ImageChecker.check(file: holder.lockedFile, path: filename, format: opened, repair: repair, report: report,
                                                 reportError: reportError)
        } catch let f as ImageCheckFailure {
            result = f.result
            failure = f.errno
            if let message = f.message { console.error(message) }
        }
        if failure == nil {
            progress.meter(100, max: 0)
            progress.finish(phase, total: 1)
        }
        endProgress()
        if failure == nil && (result.corruptionsFixed != 0 || result.leaksFixed != 0) {
            if output == .human && !quiet {
                console.out("The following inconsistencies were found and repaired:\n\n"
                            + "    \(result.leaksFixed) leaked clusters\n"
                            + "    \(result.corruptionsFixed) corruptions\n\n"
                            + "Double checking the fixed image now...\n")
            }
            let fixed = result
            do {
                result = try ImageChecker.check(file: holder.lockedFile, path: filename, format: opened, repair: .none, report: report,
                                                 reportError: reportError)
            } catch let f as ImageCheckFailure {
                result = f.result
                failure = f.errno
            }
            result.leaksFixed = fixed.leaksFixed
            result.corruptionsFixed = fixed.corruptionsFixed
        }
        if failure == nil && !quiet {
            console.out(output == .json ? jsonText(result, filename: filename, format: opened) : humanText(result))
        }
        if let failure {
            throw CLIError("Check failed: \(String(cString: strerror(failure)))")
        }
        if result.checkErrors != 0 { throw CLIError("Check failed") }
        if result.corruptions != 0 { return 2 }
        if result.leaks != 0 { return 3 }
        return 0
    }

    /// Opens the image with its backing chain as qemu-img check does (so the same images fail
    /// to open, with the same sentences) and returns its format; the check itself then works
    /// on the file. The returned holder keeps the image's locks until closed.
    static func openFormat(path: String, shown: String? = nil, format: ImageFormat?,
                           locking: ImageLocking, console: Console) throws -> (ImageFormat, LockHolder) {
        do {
            let image = try ImageOpener.open(path, options: OpenOptions(format: format, writable: false,
                                                                        cache: .writeback, openBacking: true,
                                                                        locking: locking))
            CommandSupport.warnAtOpen(image, console)
            return (image.format, LockHolder(image: image))
        } catch let error as ImageError where error.path == path && error.cause == nil
                    && error.kind == .snapshotTable {
            // qemu-img check opens the image without reading its snapshot table; the check
            // then reads it and reports what it cannot read. (The backing chain is not
            // opened in this case.) The file alone then holds the locks; its format is the
            // one asked for or the one its header says.
            let holder = try lockFile(path, shown: shown, locking)
            do {
                return (try format ?? ImageProbe.probe(path: path, file: holder.lockedFile), holder)
            } catch {
                holder.close()
                throw CLIError(CommandSupport.openFailure(error, path: path, shown: shown, wording: .wholeChain))
            }
        } catch {
            throw CLIError(CommandSupport.openFailure(error, path: path, shown: shown, wording: .wholeChain))
        }
    }

    /// What keeps an image's locks for the length of the check: the open image, or just its
    /// file when the image cannot be opened but can be checked.
    struct LockHolder {
        var image: (any DiskImage)?
        var file: DiskFile?

        /// The locked image file, which the check reopens.
        var lockedFile: DiskFile { image?.file ?? file! }

        func close() {
            try? image?.close()
            file?.close()
        }
    }

    static func lockFile(_ path: String, shown: String? = nil, _ locking: ImageLocking) throws -> LockHolder {
        let lock: ImageLock? = switch locking {
        case .standard: .reader
        case .writer: .writer
        case .forceShare: .forceShare
        case .inspect: .inspector
        case .none: nil
        }
        do {
            // The file the name means (file:X is X; json: names their file.filename).
            let file = try lock.map { try DiskFile.open(ImageName.filePath(of: path), access: .readOnly, lock: $0) }
                ?? DiskFile.open(ImageName.filePath(of: path), access: .readOnly)
            return LockHolder(file: file)
        } catch {
            // A lock conflict (ImageLockError) reads "Could not open 'PATH': LOCK ERROR" too.
            throw CLIError(CommandSupport.openFailure(error, path: path, shown: shown, wording: .wholeChain))
        }
    }

    /// qemu-img's dump_human_image_check.
    static func humanText(_ r: ImageCheckResult) -> String {
        var text = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            text += "No errors were found on the image.\n"
        } else {
            if r.corruptions != 0 {
                text += "\n\(r.corruptions) errors were found on the image.\n"
                    + "Data may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks != 0 {
                text += "\n\(r.leaks) leaked clusters were found on the image.\n"
                    + "This means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors != 0 {
                text += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let allocated = Double(r.allocatedClusters)
            text += "\(r.allocatedClusters)/\(r.totalClusters) = "
                + "\(percent(allocated * 100 / Double(r.totalClusters)))% allocated, "
                + "\(percent(Double(r.fragmentedClusters) * 100 / allocated))% fragmented, "
                + "\(percent(Double(r.compressedClusters) * 100 / allocated))% compressed clusters\n"
        }
        if r.imageEndOffset != 0 { text += "Image end offset: \(r.imageEndOffset)\n" }
        return text
    }

    /// printf's "%0.2f".
    static func percent(_ value: Double) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        // snprintf writes at most buffer.count bytes including the terminator.
        let written = withVaList([value]) { vsnprintf(&buffer, buffer.count, "%0.2f", $0) }
        let count = min(max(Int(written), 0), buffer.count - 1)
        return String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// qemu-img's ImageCheck as JSON: optional counts only when nonzero.
    static func jsonText(_ r: ImageCheckResult, filename: String, format: ImageFormat) -> String {
        var object = JSONObject()
        object["filename"] = .string(filename)
        object["format"] = .string(format.rawValue)
        object["check-errors"] = .int(r.checkErrors)
        if r.imageEndOffset != 0 { object["image-end-offset"] = .uint(r.imageEndOffset) }
        if r.corruptions != 0 { object["corruptions"] = .int(r.corruptions) }
        if r.leaks != 0 { object["leaks"] = .int(r.leaks) }
        if r.corruptionsFixed != 0 { object["corruptions-fixed"] = .int(r.corruptionsFixed) }
        if r.leaksFixed != 0 { object["leaks-fixed"] = .int(r.leaksFixed) }
        if r.totalClusters != 0 { object["total-clusters"] = .int(r.totalClusters) }
        if r.allocatedClusters != 0 { object["allocated-clusters"] = .int(r.allocatedClusters) }
        if r.fragmentedClusters != 0 { object["fragmented-clusters"] = .int(r.fragmentedClusters) }
        if r.compressedClusters != 0 { object["compressed-clusters"] = .int(r.compressedClusters) }
        return JSONWriter.pretty(.object(object)) + "\n"
    }
}
