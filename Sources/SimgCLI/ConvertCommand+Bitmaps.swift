import DiskIO
import ImageFormats

/// convert --bitmaps / --skip-broken-bitmaps: the source's persistent bitmaps copied into the
/// target after the data (names, granularity, enabled flag, bits), as qemu-img's
/// convert_copy_bitmaps: each added to the target, then the source's bits merged into it,
/// all stored by one `BitmapEditor.commit` (one crash-safe metadata switch).
extension ConvertCommand {
    /// The checks qemu-img makes once the sources are open, before the target is created:
    /// one source, a source format with bitmaps, no inconsistent bitmap unless skipped.
    /// Returns the source's bitmaps to copy (nil without --bitmaps).
    static func bitmapsToCopy(_ scan: ScanResult, sources: [any DiskImage]) throws -> [PersistentBitmap]? {
        guard scan.has("bitmaps") else { return nil }
        if sources.count > 1 { throw CLIError("Copying bitmaps only possible with single source") }
        guard let source = sources[0] as? any BitmapImage, source.supportsPersistentBitmaps else {
            throw CLIError("Source lacks bitmap support")
        }
        let bitmaps: [PersistentBitmap]
        do {
            bitmaps = try source.persistentBitmaps()
        } catch {
            throw CLIError("\(error)")
        }
        // Newest first, as qemu-img walks them (copyBitmaps).
        if !scan.has("skip-broken-bitmaps"), let broken = bitmaps.last(where: \.inUse) {
            throw CLIError("Cannot copy inconsistent bitmap '\(broken.name)'\n"
                           + "Try --skip-broken-bitmaps, or use 'simg bitmap --remove' to delete it")
        }
        return bitmaps
    }

    /// Once the target exists (created, or -n), before the copy: a target format without
    /// bitmaps (raw, qcow2 v2) is refused, the created target left in place, as qemu-img does.
    static func checkBitmapTarget(_ output: String, format: ImageFormat) throws {
        // Only looked at: the convert target opens it for writing next (no locks: ours would
        // conflict with each other).
        let target: any DiskImage
        do {
            target = try ImageOpener.open(output, options: OpenOptions(format: format, writable: false,
                                                                      openBacking: false, locking: .none))
        } catch {
            throw CLIError(CommandSupport.openFailure(error, path: output, wording: .deepestImage))
        }
        defer { try? target.close() }
        guard let bitmaps = target as? any BitmapImage, bitmaps.supportsPersistentBitmaps else {
            throw CLIError("Format driver '\(format.rawValue)' does not support bitmaps")
        }
    }

    /// After the copy: the target (closed by then) opened again for writing and given the
    /// bitmaps. qemu-img walks a node's bitmaps newest first (the reverse of the directory),
    /// so its refusals and warnings come in that order; the bitmaps are added in directory
    /// order, which is the order qemu-img stores them in.
    static func copyBitmaps(_ bitmaps: [PersistentBitmap], from source: any DiskImage, to output: String,
                            format: ImageFormat, cache: CacheMode, console: Console) throws {
        let target: any DiskImage
        do {
            target = try ImageOpener.open(output, options: OpenOptions(format: format, writable: true, cache: cache,
                                                                      openBacking: false))
        } catch {
            throw CLIError(CommandSupport.openFailure(error, path: output, wording: .deepestImage))
        }
        defer { try? target.close() }
        guard let bitmapTarget = target as? any BitmapImage, bitmapTarget.supportsPersistentBitmaps,
              let bitmapSource = source as? any BitmapImage else {
            throw CLIError("Format driver '\(format.rawValue)' does not support bitmaps")
        }
        let editor: any BitmapEditor
        do {
            editor = try bitmapTarget.bitmapEditor()
        } catch {
            throw CLIError("\(error)")
        }
        for bitmap in bitmaps.reversed() {
            if bitmap.inUse {
                console.error("warning: Skipping inconsistent bitmap '\(bitmap.name)'")
            } else if editor.bitmaps.contains(where: { $0.name == bitmap.name }) {
                throw CLIError("Failed to create bitmap \(bitmap.name): Bitmap already exists: \(bitmap.name)")
            }
        }
        for bitmap in bitmaps where !bitmap.inUse {
            do {
                try editor.add(bitmap.name, granularity: bitmap.granularity, disabled: !bitmap.enabled)
            } catch {
                throw CLIError("Failed to create bitmap \(bitmap.name): \(error)")
            }
            do {
                try editor.merge(into: bitmap.name, source: bitmap.name) { try bitmapSource.loadBitmap(named: bitmap.name) }
            } catch {
                throw CLIError("Failed to populate bitmap \(bitmap.name): \(error)")
            }
        }
        do {
            if editor.hasChanges { try editor.commit() }
        } catch {
            throw CLIError("\(error)")
        }
    }
}
