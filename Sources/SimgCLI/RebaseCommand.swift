import DiskIO
import Glibc
import ImageFormats
import Pipeline

/// `simg rebase [--object objectdef] [--image-opts] [-q] [-p] [-U] [-f fmt] [-t cache] [-T src_cache] [-u] -b backing_file
/// [-F backing_fmt] filename` with qemu-img 7.2's contract: in safe mode the overlay first gets
/// every cluster where its old chain and the new backing file differ, then (after a sync) the
/// header names the new backing file; `-u` changes the header only; `-b ""` makes the image
/// standalone.
enum RebaseCommand {
    static let command = Command(
        name: "rebase",
        synopsis: "rebase [--object objectdef] [--image-opts] [-q] [-p] [-U] [-f fmt] [-t cache] [-T src_cache] [-u] -b backing_file [-F backing_fmt] filename",
        details: [
            "Changes the backing file of an image.",
            "  '-b' names the new backing file (relative names are relative to the image's folder);",
            "       an empty name makes the image standalone",
            "  '-F' is the new backing file's format (stored in the image; required unless -b is empty)",
            "  '-u' (unsafe) only rewrites the header: the new backing file need not exist",
            "  '-f' names the image's format instead of probing it",
            "  '-t' and '-T' are the cache modes (accepted as qemu-img does)",
            "  '-p' shows progress (qemu-img's meter); '-q' prints nothing but errors",
            "  '--progress=json' JSON lines on stderr, phase \"compare\" (see README)",
            "  '-U' (force share) reads the new backing file even if another process writes it",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2);",
            "       '-b' stays a name (relative to the list's file.filename), as in qemu-img",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, .value("F", "backing-format"), .value("b", "backing"),
                  .value("t", "cache"), .value("T", "source-cache"), .flag("u", "unsafe"),
                  CommandSupport.forceShareOption,
                  CommandSupport.objectOption, CommandSupport.imageOptsOption] + Progress.optionSpecs,
        modifiesImages: { _ in true },
        run: run)


    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img creates each --object while it reads its options: before the operand checks.
        if try CommandSupport.objects(scan, console: console) { return 0 }
        let unsafe = scan.has("unsafe")
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        guard let newName = scan.last("backing") ?? (unsafe ? "" : nil) else {
            throw CLIError.usage("Must specify backing file (-b) or use unsafe mode (-u)")
        }
        // qemu-img starts its meter (2 % steps) here, before opening anything, and ends the
        // line (a newline) whatever happens after.
        let progress = try Progress.make(scan, minSkip: 2, console: console)
        defer { progress.end() }
        progress.meter(0, max: 100)
        // Accepted and checked as qemu-img does; rebase reads and writes through the page cache.
        _ = try CommandSupport.cacheMode(scan, "cache", default: .writeback, source: false)
        _ = try CommandSupport.cacheMode(scan, "source-cache", default: .writeback, source: true)
        // The format stored with the new name; the one it is opened with, if simg has it.
        let backingFormatName = scan.last("backing-format")
        var backingFormat: ImageFormat?
        if let name = backingFormatName {
            do { backingFormat = try ImageFormat(named: name) } catch {
                // -u stores any QEMU driver name, as create -u does; opening the new backing
                // file needs a format simg has.
                if !error.isQEMUDriver { throw CLIError("Invalid format name: '\(name)'") }
                if !unsafe, !newName.isEmpty {
                    throw CLIError("Could not open new backing file '\(newName)': \(error)")
                }
            }
        }
        let format = try CommandSupport.format(scan, opening: filename)
        // With --image-opts the overlay is opened (and compared, and its folder found) by the
        // list's json: name; messages quote the list as written.
        let image = try CommandSupport.imageName(filename, imageOpts: scan.has("image-opts"), console: console)

        // The overlay, writable; in safe mode with its old chain (read-only) to compare against.
        let overlay = try CommandSupport.open(image, shown: filename,
                                              OpenOptions(format: format, writable: true, cache: .writeback,
                                                          openBacking: !unsafe),
                                              wording: .wholeChain, console: console)
        var newBacking: (any DiskImage)?
        // Set when the new backing file could not be locked because its chain reaches the
        // overlay, which this process holds for writing: a loop, refused as such below.
        var newChainHasOverlay = false
        defer {
            try? newBacking?.close()
            try? overlay.close()
        }
        if !unsafe && !newName.isEmpty {
            // qemu opens the new name relative to the overlay's folder, as a backing file.
            let resolved = ImageName.resolve(backing: newName, relativeTo: ImageName.filePath(of: image))
            do {
                // As qemu-img rebase: -U shares the new backing file (the overlay and its old
                // chain keep their locks).
                newBacking = try ImageOpener.open(resolved, options: OpenOptions(format: backingFormat, writable: false,
                                                                                 cache: .writeback, openBacking: true,
                                                                                 locking: CommandSupport.readLocking(scan)))
                if let newBacking { CommandSupport.warnAtOpen(newBacking, console) }
            } catch where ImageOpener.failedOnLock(error)
                        && chain(from: resolved, opened: nil, format: backingFormat, contains: image) {
                newChainHasOverlay = true
            } catch {
                // qemu names the file as given, then the open(2) failure once, with the resolved name.
                var reason = CommandSupport.openFailure(error, path: resolved, wording: .wholeChain)
                // A name that does not even parse: only why ("Unknown protocol 'c'").
                if (try? ImageName.parse(resolved)) == nil { reason = Backend.nameProblem(resolved) }
                if let io = error as? IOError, io.operation == .open { reason = "\(io)" }
                // A lock conflict is QEMU's own error, without the "Could not open '\(resolved)'"
                // qemu-img's image opener adds: "... new backing file 'x': Failed to get shared ...".
                if ImageOpener.failedOnLock(error) {
                    let parts = CommandSupport.openFailureParts(error, path: resolved, wording: .wholeChain)
                    if parts.name == resolved { reason = parts.reason }
                }
                throw CLIError("Could not open new backing file '\(newName)': \(reason)")
            }
        }
        let change = "Could not change the backing file to '\(newName)'"
        if !newName.isEmpty && backingFormatName == nil {
            // qemu-img 7.2 refuses to store a backing file without its format.
            throw CLIError("\(change): backing format must be specified")
        }
        // With -u nothing opened the name: simg never stores one QEMU could not open.
        if unsafe, let problem = ImageName.backingNameProblem(newName) {
            throw CLIError("\(change): \(problem)")
        }
        guard overlay.format.capabilities.contains(.backingFiles) else {
            throw CLIError("\(change): Operation not supported")
        }
        // A new backing file that is the overlay, or whose chain leads back to it, would leave
        // an image nothing can open (qemu-img only escapes this through its image locks).
        if !newName.isEmpty {
            let resolved = ImageName.resolve(backing: newName, relativeTo: ImageName.filePath(of: image))
            if newChainHasOverlay || chain(from: resolved, opened: newBacking, format: backingFormat, contains: image) {
                throw CLIError("\(change): Backing file '\(newName)' creates an infinite loop")
            }
        }

        do {
            if !unsafe {
                let size = overlay.virtualSize
                // qemu-img's fixed share per step: (float)100 / (size / MIN(size, IO_BUF_SIZE)).
                let share: Float = size == 0 ? 0 : Float(100) / Float(size / min(size, 2 << 20))
                progress.bytes("compare", done: 0, total: size)
                _ = try RebaseCopier.copyDifferences(overlay: overlay, newBacking: newBacking,
                                                     sharedLayer: layer(of: overlay, sameFileAs: newBacking),
                                                     progress: { done, total in
                                                         progress.meter(share, max: 100)
                                                         progress.bytes("compare", done: done, total: total)
                                                     })
                try overlay.flush()
                progress.finish("compare", total: size)
            }
            // qemu-img prints 100 % once the header change was tried, whether it worked or not.
            defer { progress.meter(100, max: 0) }
            try overlay.changeBackingFile(name: newName, format: newName.isEmpty ? nil : backingFormatName)
        } catch let error as InterruptedError {
            // The copy, and the header change once its header is written, name the overlay
            // themselves; a signal seen by a sync of the flush before (DiskFile.sync throws once
            // one is pending) arrives without a name, and the header is still the old one.
            throw error.naming(filename, outcome: "was not rebased (its content is unchanged)")
        } catch let error as BackingChangeError {
            throw CLIError("\(change): \(error)")
        } catch let error as ImageError {
            throw CLIError("Error while rebasing '\(filename)': \(error)")
        }
        // Closing stores what the format keeps until then (qcow2's persistent bitmaps); the
        // new header is written by now.
        do { try CommandSupport.closeFinished(overlay) } catch let error as ImageError {
            throw CLIError("Error while rebasing '\(filename)': \(error)")
        }
        return 0
    }

    /// Whether the image at `path` (already open as `opened` in safe mode) or any image of its
    /// backing chain is the same file as `target`. In unsafe mode the chain is opened only to
    /// look; if it cannot be opened (the point of -u), there is nothing to compare.
    static func chain(from path: String, opened: (any DiskImage)?, format: ImageFormat?,
                      contains target: String) -> Bool {
        guard let wanted = ImageName.identity(of: target) else { return false }
        if ImageName.identity(of: path) == wanted { return true }
        var probe: (any DiskImage)?
        if opened == nil {
            // Only looking, at files this process may hold for writing (the overlay): no locks.
            probe = try? ImageOpener.open(path, options: OpenOptions(format: format, writable: false,
                                                                     cache: .writeback, openBacking: true, locking: .none))
        }
        defer { try? probe?.close() }
        var layer = opened ?? probe
        while let current = layer {
            if ImageName.identity(of: current.path) == wanted { return true }
            layer = current.backing
        }
        return false
    }

    /// The image in `overlay`'s old chain that is the same file (device and inode) as `image`.
    static func layer(of overlay: any DiskImage, sameFileAs image: (any DiskImage)?) -> (any DiskImage)? {
        guard let image, let target = ImageName.identity(of: image.path) else { return nil }
        var layer = overlay.backing
        while let current = layer {
            if current.format == image.format, ImageName.identity(of: current.path) == target { return current }
            layer = current.backing
        }
        return nil
    }

}
