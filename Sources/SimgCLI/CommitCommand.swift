import DiskIO
import ImageFormats
import Pipeline

/// `simg commit [--object objectdef] [--image-opts] [-q] [-p] [-f fmt] [-t cache] [-b base] [-d] [-r rate] filename` with qemu-img
/// 7.2's contract: everything the image (and, with -b, every layer above the base) holds is
/// written into its backing file (or `-b base`), the base growing when it is smaller; the
/// base is flushed; then, unless -d (which -b implies), the image is emptied so it reads
/// from the base. At every moment the image reads the same through its chain.
enum CommitCommand {
    static let command = Command(
        name: "commit",
        synopsis: "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename",
        details: [
            "Commits the changes recorded in an image into its backing file.",
            "  '-b' names the image of the backing chain to commit into (default: the",
            "       immediate backing file); relative names as the chain stores them or",
            "       relative to the folder of the image naming them; implies -d",
            "  '-d' leaves the image as it is instead of emptying it",
            "  '-r' limits the speed (bytes per second; k, M, G... suffixes)",
            "  '-f' names the image's format instead of probing it",
            "  '-t' is the cache mode of the image and the base (default writeback)",
            "  '-p' shows progress (qemu-img's meter); '-q' prints nothing but errors",
            "  '--progress=json' JSON lines on stderr, phase \"commit\" (see README)",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2);",
            "       '-b base' stays a name, as in qemu-img",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, .value("t", "cache"), .value("b", "base"),
                  .flag("d", "drop"), .value("r", "rate"),
                  CommandSupport.objectOption, CommandSupport.imageOptsOption] + Progress.optionSpecs,
        modifiesImages: { _ in true },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        let quiet = scan.has("quiet")
        // qemu-img parses -r and creates each --object while it reads its options, in
        // command-line order.
        var rate: UInt64 = 0
        if try CommandSupport.objects(scan, console: console, parsing: ["rate": { rate = try rateLimit($0) }]) {
            return 0
        }
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        let cache = try CommandSupport.cacheMode(scan, "cache", default: .writeback, source: false)
        try Progress.checkFormat(scan)
        let baseName = scan.last("base")
        let drop = scan.has("drop") || baseName != nil
        let format = try CommandSupport.format(scan, opening: filename)
        let top = try CommandSupport.open(filename, imageOpts: scan.has("image-opts"),
                                          OpenOptions(format: format, writable: true, cache: cache, openBacking: true),
                                          wording: .wholeChain, console: console)
        var base: (any DiskImage)?
        defer {
            try? base?.close()
            try? top.close()
        }
        // qemu-img starts its meter (1 % steps) once the image is open and prints the first
        // line before looking for the base; it ends the line (a newline) whatever happens after.
        let progress = try Progress.make(scan, minSkip: 1, console: console)
        progress.meter(0, max: 100)
        // Set once the base holds everything on disk: an interruption after it only stops the
        // emptying of the top, which reads the same either way.
        var committed = false
        do {
            let (layer, depth) = try findBase(baseName, top: top, filename: filename)
            do {
                base = try ImageOpener.reopenWritable(layer, cache: cache)
            } catch let error as ImageError where error.kind == .lockConflict {
                // qemu-img reopens the base read-write: its lock error, with no "Could not open".
                throw CLIError(error.message)
            } catch {
                throw CLIError(CommandSupport.openFailure(error, path: layer.path, wording: .deepestImage))
            }
            guard let base else { return 1 }
            // An image that cannot be emptied is refused before the base changes.
            if !drop, let emptiable = top as? any EmptiableImage { try emptiable.checkEmptiable() }
            if base.virtualSize < top.virtualSize {
                // As qemu's commit truncates its target up: resize's growth, no preallocation.
                guard let resizable = base as? any ResizableImage else {
                    throw CLIError("Could not resize '\(base.path)' to \(top.virtualSize) bytes: Operation not supported")
                }
                try resizable.resize(to: top.virtualSize, preallocation: .off)
            }
            // qemu-img prints the block job's progress (offset / length of the top, as float
            // percent) each time its loop wakes up: the job's first look (0 %) on the way in,
            // its last (100 %) on the way out; the values between depend on timing there.
            let total = top.virtualSize
            _ = try CommitCopier.copy(top: top, baseDepth: depth, into: base, rateLimit: rate,
                                      progress: { done, size in
                                          progress.meter(size == 0 ? 0 : Float(done) / Float(size) * 100, max: 0)
                                          progress.bytes("commit", done: done, total: size)
                                      })
            progress.meter(100, max: 0)
            // The base holds the data on stable storage before the top lets go of anything.
            try base.flush()
            committed = true
            // run_block_job's final 100 % once the job completed.
            progress.meter(100, max: 0)
            progress.finish("commit", total: total)
            if !drop, let emptiable = top as? any EmptiableImage {
                try emptiable.makeEmpty()
                try top.flush()
            }
            // Closing stores what the formats keep until then (qcow2's persistent bitmaps).
            try CommandSupport.closeFinished(base)
            try CommandSupport.closeFinished(top)
        } catch {
            progress.end()
            if let interrupted = error as? InterruptedError {
                throw interrupted.naming(filename, outcome: committed
                                         ? "was committed but not emptied (it reads the same; clusters may be leaked)"
                                         : "was not committed (it reads as before)")
            }
            if let image = error as? ImageError { throw CLIError("\(image)") }
            throw error
        }
        progress.end()
        if !quiet { console.out("Image committed.\n") }
        return 0
    }

    /// The base: `-b NAME`'s image of the chain below the top, or the immediate backing
    /// file; with its depth (1: the immediate backing file).
    static func findBase(_ name: String?, top: any DiskImage, filename: String) throws -> (any DiskImage, Int) {
        guard let name else {
            guard let backing = top.backing else { throw CLIError("Image does not have a backing file") }
            return (backing, 1)
        }
        // As qemu's bdrv_find_backing_image: the name as an image stores it, else the name
        // resolved against the folder of the image naming it, compared as files.
        var parent = top
        var depth = 1
        while let layer = parent.backing {
            if parent.backingReference?.name == name { return (layer, depth) }
            let resolved = ImageName.resolve(backing: name, relativeTo: parent.file.path)
            if let wanted = ImageName.identity(of: resolved), wanted == ImageName.identity(of: layer.path) {
                return (layer, depth)
            }
            parent = layer
            depth += 1
        }
        throw CLIError("Did not find '\(name)' in the backing chain of '\(filename)'")
    }

    /// `-r`, as qemu-img's cvtnum("rate limit").
    static func rateLimit(_ text: String) throws -> UInt64 { try CommandSupport.cvtnum(text, "rate limit") }
}
