import DiskIO
import Glibc
import ImageFormats

/// `simg snapshot [--object objectdef] [--image-opts] [-q] [-U] [-l | -a snapshot | -c snapshot | -d snapshot] filename` with
/// qemu-img 7.2's contract: `-l` lists the table (even with -q; nothing when there are no
/// snapshots), `-c` creates, `-a` applies (by ID, then by name), `-d` deletes (by name only, as
/// 7.2 does); no action opens the image read-write and does nothing. The image is opened
/// without its backing chain, as qemu-img does.
enum SnapshotCommand {
    static let command = Command(
        name: "snapshot",
        synopsis: "snapshot [--object objectdef] [--image-opts] [-q] [-U] [-l | -a snapshot | -c snapshot | -d snapshot] filename",
        details: [
            "Lists, creates, applies or deletes internal snapshots (qcow2).",
            "  '-l' lists the snapshots (printed even with -q)",
            "  '-c' creates a snapshot of the current state; '-d' deletes the first snapshot with",
            "       that name; '-a' makes the image's current state the snapshot's (by ID, then name)",
            "  '-U' (force share) lists the snapshots of an image another process has open (-l only)",
            "  '-q' prints nothing but errors",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [.flag("l", "list"), .value("a", "apply"), .value("c", "create"), .value("d", "delete"),
                  CommandSupport.forceShareOption, CommandSupport.objectOption, CommandSupport.imageOptsOption],
        modifiesImages: { scan in !scan.has("list") },
        run: run)

    enum Action { case list, apply(String), create(String), delete(String) }

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img takes the action and creates each --object while it reads its options, in
        // command-line order.
        var action: Action?
        func take(_ next: Action) throws {
            if action != nil { throw CLIError.usage("Cannot mix '-l', '-a', '-c', '-d'") }
            action = next
        }
        if try CommandSupport.objects(scan, console: console, parsing: [
            "list": { _ in try take(.list) },
            "apply": { try take(.apply($0)) },
            "create": { try take(.create($0)) },
            "delete": { try take(.delete($0)) },
        ]) { return 0 }
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        let listing: Bool
        if case .list = action { listing = true } else { listing = false }
        if CommandSupport.forceShare(scan) && !listing {
            // Every other action (and none) opens the image read-write.
            throw CLIError("Could not open '\(filename)': force-share=on can only be used with read-only images")
        }
        let imageOpts = scan.has("image-opts")
        let openName = try CommandSupport.imageName(filename, imageOpts: imageOpts, console: console)
        let image = try CommandSupport.open(openName, shown: filename,
                                            OpenOptions(writable: !listing, cache: .writeback, openBacking: false,
                                                        locking: CommandSupport.readLocking(scan)),
                                            wording: .deepestImage, console: console)
        defer { try? image.close() }
        // Every action but -l opens the image read-write (none too).
        if !listing {
            CommandSupport.warnIfProbedForWriting(image, name: openName, written: filename, imageOpts: imageOpts,
                                                  format: nil, console: console)
        }
        let snapshotting = image as? any SnapshottingImage
        switch action {
        case nil:
            break
        case .list:
            let list = snapshotting?.snapshotList ?? []
            if !list.isEmpty {
                // Printed with -q too, as qemu-img does.
                var text = "Snapshot list:\n" + InfoReport.snapshotHeader + "\n"
                for snapshot in list { text += InfoReport.snapshotRow(snapshot) + "\n" }
                console.out(text)
            }
        case .create(let name):
            guard let snapshotting else { throw failure("create", name, SnapshotFailure(code: ENOTSUP), image: filename) }
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            // qemu-img keeps microseconds, and at most 255 bytes of the name.
            let stored = FileName.decode(FileName.bytes(of: name).prefix(255))
            do {
                try snapshotting.createSnapshot(name: stored, dateSeconds: UInt32(truncatingIfNeeded: now.tv_sec),
                                                dateNanoseconds: UInt32(now.tv_nsec / 1000 * 1000))
            } catch { throw failure("create", name, error, image: filename) }
        case .apply(let name):
            guard let snapshotting else {
                // QEMU's bdrv_snapshot_goto falls back to the file below, reopening the
                // format driver on the way: a probed raw image warns a second time.
                CommandSupport.warnIfProbedForWriting(image, name: openName, written: filename, imageOpts: imageOpts,
                                                      format: nil, console: console)
                throw CLIError("Could not apply snapshot '\(name)': Block driver does not support snapshots")
            }
            do { try snapshotting.applySnapshot(name) } catch { throw failure("apply", name, error, image: filename) }
        case .delete(let name):
            guard let snapshotting else { throw failure("delete", name, SnapshotFailure(code: ENOENT, message: "snapshot not found"), image: filename) }
            do { try snapshotting.deleteSnapshot(named: name) } catch { throw failure("delete", name, error, image: filename) }
        }
        try image.close()
        return 0
    }

    /// qemu-img's wording per action: create prints the errno ("-95 (Operation not supported)"),
    /// apply prefixes "Failed to load snapshot: ", delete QEMU's own sentence.
    static func failure(_ verb: String, _ name: String, _ error: any Error, image: String) -> any Error {
        let head = "Could not \(verb) snapshot '\(name)': "
        // Stopped by SIGINT/SIGTERM: before the header switch the image is as it was (the
        // format names the image itself when the switch was already written).
        if let interrupted = error as? InterruptedError {
            return interrupted.naming(image, outcome: "is unchanged (the snapshot was not \(verb == "apply" ? "applied" : verb + "d"))")
        }
        guard let f = error as? SnapshotFailure else { return CLIError(head + "\(error)") }
        switch verb {
        case "create":
            return CLIError(head + (f.message ?? "-\(f.code) (\(String(cString: strerror(f.code))))"))
        case "apply":
            return CLIError(head + (f.message ?? "Failed to load snapshot: \(String(cString: strerror(f.code)))"))
        default:
            return CLIError(head + f.description)
        }
    }
}
