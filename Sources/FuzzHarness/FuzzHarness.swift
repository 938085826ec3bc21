import DiskIO
import Glibc
import ImageFormats
import Synchronization

/// What one fuzz input goes through: the bytes become a file in a private folder, which is
/// probed, opened as qcow2 and as raw (read-only), asked for its info, walked with block status
/// over the whole virtual size, read (a bounded amount, every kind of extent) and checked
/// read-only; snapshot create/apply/delete and check -r all then run on the harness's own copy.
/// Errors are the expected outcome for most inputs and are swallowed (counted in the
/// returned `Outcome`); a trap, a hang or an unbounded allocation is a bug in the library.
///
/// Shared by the libFuzzer executable in Fuzz/ (`make fuzz`) and the regression replay in
/// Tests/FuzzHarnessTests (`make test`).
///
/// Host files: an input names files (a backing file, an external data file). The harness never
/// lets the library open a name that leads outside its private folder: backing files are
/// followed only for plain names (no "/"), which resolve inside the folder; an external data
/// file is allowed only when its name does not exist or resolves inside the folder (otherwise
/// the qcow2 open is skipped). The folder holds the input and two small raw files the seeds
/// name, `backing.raw` and `data.raw`.
public enum FuzzHarness {
    /// Block-status extents walked per opened image (an image can have millions).
    public static let maxExtents = 10_000
    /// Guest bytes read per opened image, spread over the extents.
    public static let readBudget = 4 << 20
    /// Largest single read.
    static let readChunk = 64 << 10
    /// Size of the helper files `backing.raw` and `data.raw`.
    static let helperFileSize = 256 << 10

    /// What happened to one input (for tests; the fuzzer ignores it).
    public struct Outcome: Sendable {
        /// The probed format, nil when probing failed or found an unsupported format.
        public var probed: ImageFormat?
        /// Formats the input opened as.
        public var opened: [ImageFormat] = []
        /// Extents walked and guest bytes read, over all opens.
        public var extents = 0
        public var bytesRead = 0
        /// Extent kinds seen ("data", "compressed", "zero", "backing", "hole"), by the format
        /// the input was opened as.
        public var kinds: [ImageFormat: Set<String>] = [:]
        /// The read-only qcow2 check ran to a result (it may have found corruption).
        public var checkCompleted = false
        /// The repairing check (-r all, on the harness's own copy) ran to a result.
        public var repairCompleted = false
        /// The bitmap actions (add, merge, remove, stored) ran on the harness's copy.
        public var bitmapsCompleted = false
        /// The snapshot actions (on the harness's own copy) that completed: "create",
        /// "apply", "delete", "apply-first" (the input's own first snapshot).
        public var snapshotActions: [String] = []
        /// The qcow2 open was skipped because the input names a data file outside the folder.
        public var skippedDataFile = false
        /// Every error thrown, as simg would print it.
        public var errors: [String] = []
        /// The name the input had while it ran (errors name it).
        public var inputPath = ""
    }

    /// Runs the bytes through the library. Thread-safe (runs are serialised: they share the folder).
    @discardableResult
    public static func run(_ bytes: UnsafeRawBufferPointer) -> Outcome {
        workspace.withLock { slot in
            if slot == nil { slot = Workspace.make() }
            guard let space = slot else {
                // No private folder (no writable temporary file system): nothing can be tested.
                var outcome = Outcome()
                outcome.errors.append("fuzz harness: could not create a private folder")
                return outcome
            }
            return space.run(bytes)
        }
    }

    @discardableResult
    public static func run(_ bytes: [UInt8]) -> Outcome {
        bytes.withUnsafeBytes { run($0) }
    }

    /// Replays a file (a regression input or a corpus entry).
    @discardableResult
    public static func run(path: String) throws -> Outcome {
        let file = try DiskFile.open(path, access: .readOnly)
        defer { file.close() }
        let size = try file.size()
        guard size <= 64 << 20 else {
            throw ImageError(path: path, message: "fuzz input is larger than 64 MiB")
        }
        let bytes = try file.readBytes(count: Int(size), at: 0)
        return run(bytes)
    }

    /// Makes the private folder the current directory, so that external data file names
    /// (which QEMU resolves against the current directory) can name `data.raw`. For the fuzzer
    /// process only: the current directory is process-wide.
    public static func enterPrivateFolder() {
        workspace.withLock { slot in
            if slot == nil { slot = Workspace.make() }
            if let folder = slot?.folder { _ = chdir(folder) }
        }
    }

    /// The private folder, or nil if it could not be made.
    public static var privateFolder: String? {
        workspace.withLock { slot in
            if slot == nil { slot = Workspace.make() }
            return slot?.folder
        }
    }

    private static let workspace = Mutex<Workspace?>(nil)
}

/// The private folder and the open input file, made once per process and removed at exit.
final class Workspace: @unchecked Sendable {
    // @unchecked Sendable: only used inside FuzzHarness.workspace's mutex.
    let folder: String
    let inputPath: String
    let inputFD: Int32

    private init(folder: String, inputPath: String, inputFD: Int32) {
        self.folder = folder
        self.inputPath = inputPath
        self.inputFD = inputFD
    }

    /// The folder most recently made, for removal at exit.
    nonisolated(unsafe) private static var madeFolder: String?
    // nonisolated(unsafe): written once under FuzzHarness.workspace's mutex, read by the
    // atexit handler after all runs.

    static func make() -> Workspace? {
        var base = "/dev/shm"
        if access(base, W_OK) != 0 {
            base = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        }
        removeAbandonedFolders(in: base)
        // The process id in the name lets a later run remove the folder if this process dies
        // without running its atexit handler (libFuzzer ends workers with _Exit, crashes do).
        var template = Array("\(base)/\(folderPrefix)\(getpid())-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer -> Bool in
            // Sound: the buffer is NUL-terminated and mkdtemp writes only the X's in place.
            mkdtemp(buffer.baseAddress!) != nil
        }
        guard made else { return nil }
        let folder = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        for (name, seed) in [("backing.raw", UInt8(0x5a)), ("data.raw", UInt8(0xd7))] {
            guard writeHelper("\(folder)/\(name)", seed: seed) else { return nil }
        }
        // A qcow2 backing file over backing.raw, so an input naming it reads a two-level chain.
        guard makeQcow2Helper(folder) else { return nil }
        let inputPath = "\(folder)/input"
        // O_EXCL: the folder is new (mkdtemp), so the input is a file this process creates,
        // never something else's under that name.
        let fd = Glibc.open(inputPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return nil }
        madeFolder = folder
        atexit {
            guard let folder = Workspace.madeFolder else { return }
            for name in Workspace.fileNames { FileRemoval.removeRegularFile("\(folder)/\(name)") }
            rmdir(folder)
        }
        return Workspace(folder: folder, inputPath: inputPath, inputFD: fd)
    }

    private static let folderPrefix = "simg-fuzz-"
    private static let fileNames = ["input", "backing.raw", "data.raw", "backing.qcow2"]

    /// Removes the folders of harness processes that no longer run (only the files the harness
    /// makes, and only regular files: a folder with anything else in it stays).
    private static func removeAbandonedFolders(in base: String) {
        guard let dir = opendir(base) else { return }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                // Sound: d_name is a NUL-terminated array inside the dirent.
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            guard name.hasPrefix(folderPrefix) else { continue }
            let rest = name.dropFirst(folderPrefix.count)
            guard let dash = rest.firstIndex(of: "-"), let pid = Int32(rest[rest.startIndex..<dash]), pid > 0 else { continue }
            guard kill(pid, 0) != 0 && errno == ESRCH else { continue }
            let folder = "\(base)/\(name)"
            for file in fileNames { FileRemoval.removeRegularFile("\(folder)/\(file)") }
            rmdir(folder)
        }
    }

    /// backing.qcow2: 512 KiB, 512-byte clusters, backed by backing.raw (256 KiB), 4 KiB of
    /// its own data at 64 KiB and zeros at 128 KiB.
    private static func makeQcow2Helper(_ folder: String) -> Bool {
        let path = "\(folder)/backing.qcow2"
        let request = CreateRequest(format: .qcow2, path: path, size: 512 << 10,
                                    options: [CreateOption(name: "cluster_size", value: "512")],
                                    backingFile: "backing.raw", backingFormat: "raw")
        do {
            try ImageCreator.create(request, announce: { _ in })
            // With its backing file open: copy-on-write of a partial cluster needs it.
            let image = try ImageOpener.open(path, options: OpenOptions(writable: true))
            defer { try? image.close() }
            let data = [UInt8](repeating: 0xb7, count: 4096)
            try data.withUnsafeBytes { try image.write($0, at: 64 << 10) }
            try image.writeZeroes(at: 128 << 10, length: 4096)
            try image.close()
            return true
        } catch {
            return false
        }
    }

    /// A small raw file with a recognisable pattern (each 512-byte sector starts with its number).
    private static func writeHelper(_ path: String, seed: UInt8) -> Bool {
        var bytes = [UInt8](repeating: seed, count: FuzzHarness.helperFileSize)
        for sector in 0..<(bytes.count / 512) {
            bytes[sector * 512] = UInt8(truncatingIfNeeded: sector)
            bytes[sector * 512 + 1] = UInt8(truncatingIfNeeded: sector >> 8)
        }
        guard let file = try? DiskFile.create(path) else { return false }
        defer { file.close() }
        return (try? file.write(bytes, at: 0)) != nil
    }

    func run(_ bytes: UnsafeRawBufferPointer) -> FuzzHarness.Outcome {
        var outcome = FuzzHarness.Outcome()
        outcome.inputPath = inputPath
        guard store(bytes) else {
            outcome.errors.append("fuzz harness: could not write '\(inputPath)'")
            return outcome
        }
        let header = qcow2Header(bytes)
        let followBacking = header.flatMap { $0.backingFileName }.map(isPlainName) ?? false
        let dataFileSafe = header.map(dataFileIsSafe) ?? true

        // Probing alone (the open below probes again through ImageOpener).
        do {
            let file = try DiskFile.open(inputPath, access: .readOnly)
            defer { file.close() }
            outcome.probed = try ImageProbe.probe(path: inputPath, file: file)
        } catch {
            outcome.errors.append("\(error)")
        }
        // The probed open, then the other format forced.
        let probedIsQcow2 = outcome.probed == .qcow2
        if !probedIsQcow2 || dataFileSafe {
            exercise(format: nil, followBacking: followBacking, &outcome)
        }
        if probedIsQcow2 {
            exercise(format: .raw, followBacking: false, &outcome)
        } else if dataFileSafe {
            exercise(format: .qcow2, followBacking: followBacking, &outcome)
        }
        if !dataFileSafe { outcome.skippedDataFile = true }

        do {
            _ = try ImageChecker.check(path: inputPath, format: .qcow2, repair: .none, report: { _ in })
            outcome.checkCompleted = true
        } catch {
            outcome.errors.append(Self.describe(error, inputPath))
        }

        // What `simg snapshot -c/-a/-d` do to a hostile image; then the input is put back as
        // it came for the repair below.
        if outcome.probed == .qcow2 && dataFileSafe {
            exerciseSnapshots(&outcome)
            guard store(bytes) else {
                outcome.errors.append("fuzz harness: could not write '\(inputPath)'")
                return outcome
            }
        }

        // What `simg check -r all` does to a hostile image, on the harness's own copy (the
        // input file is rewritten for every run); then the repaired image is read again.
        if outcome.probed == .qcow2 {
            do {
                _ = try ImageChecker.check(path: inputPath, format: .qcow2, repair: .all, report: { _ in })
                outcome.repairCompleted = true
            } catch {
                outcome.errors.append(Self.describe(error, inputPath))
            }
            // A header that no longer parses makes the open fail before any name is used.
            let repaired = storedHeader()
            if repaired.map(dataFileIsSafe) ?? true {
                let follow = repaired.flatMap { $0.backingFileName }.map(isPlainName) ?? false
                exercise(format: .qcow2, followBacking: follow, &outcome)
            }
        }
        if outcome.probed == .qcow2 { exerciseBitmaps(&outcome) }
        return outcome
    }

    /// `simg bitmap` on the harness's copy (after the repair above): a bitmap added, every
    /// consistent one merged into it, the first one removed, all stored in one switch; then the
    /// image opened read-only again and checked. Only for images up to 1 GiB (bitmaps cost
    /// memory by the virtual size, up to QEMU's 512 MiB limit).
    private func exerciseBitmaps(_ outcome: inout FuzzHarness.Outcome) {
        guard let header = storedHeader(), dataFileIsSafe(header), header.size <= 1 << 30 else { return }
        do {
            let image = try ImageOpener.open(inputPath, options: OpenOptions(format: .qcow2, writable: true, openBacking: false))
            defer { try? image.close() }
            guard let bitmaps = image as? any BitmapImage else { return }
            let editor = try bitmaps.bitmapEditor()
            let existing = editor.bitmaps
            try? editor.add("fuzz", granularity: nil, disabled: false)
            for bitmap in existing where !bitmap.inUse {
                try? editor.merge(into: "fuzz", source: bitmap.name) { try editor.content(of: bitmap.name) }
            }
            if let first = existing.first { try? editor.remove(first.name) }
            try editor.commit()
            try image.close()
            let again = try ImageOpener.open(inputPath, options: OpenOptions(format: .qcow2, openBacking: false))
            defer { try? again.close() }
            _ = try (again as? any BitmapImage)?.persistentBitmaps()
            _ = try ImageChecker.check(path: inputPath, format: .qcow2, repair: .none, report: { _ in })
            outcome.bitmapsCompleted = true
        } catch {
            outcome.errors.append(Self.describe(error, inputPath))
        }
    }

    /// Snapshot create, apply and delete as `simg snapshot` runs them (the image opened for
    /// writing without its backing chain), on the harness's copy: a snapshot of the current
    /// state is created, applied and deleted, then the input's own first snapshot (if any) is
    /// applied, which walks whatever tables the input carries. Each action is a fresh open, as
    /// each is a separate simg run. Errors are expected; a trap is a bug.
    private func exerciseSnapshots(_ outcome: inout FuzzHarness.Outcome) {
        func action(_ name: String, _ body: (any SnapshottingImage) throws -> Void) {
            let image: any DiskImage
            do {
                image = try ImageOpener.open(inputPath, options: OpenOptions(format: .qcow2, writable: true,
                                                                             openBacking: false))
            } catch {
                outcome.errors.append("\(error)")
                return
            }
            defer { try? image.close() }
            guard let snapshotting = image as? any SnapshottingImage else { return }
            do {
                try body(snapshotting)
                try image.close()
                outcome.snapshotActions.append(name)
            } catch let failure as SnapshotFailure where failure.code == EBUSY {
                // Apply refused on an image with persistent bitmaps, as qemu-img refuses it.
                outcome.snapshotActions.append(name + " (refused: bitmaps)")
            } catch {
                outcome.errors.append(Self.describeSnapshot(error, inputPath))
            }
        }
        action("create") { try $0.createSnapshot(name: "fuzz", dateSeconds: 0, dateNanoseconds: 0) }
        action("apply") { try $0.applySnapshot("fuzz") }
        action("delete") { try $0.deleteSnapshot(named: "fuzz") }
        action("apply-first") { image in
            guard let first = image.snapshotList.first else { return }
            try image.applySnapshot(first.id)
        }
    }

    /// SnapshotFailure carries no file name (simg words it per action): name it here.
    private static func describeSnapshot(_ error: any Error, _ path: String) -> String {
        if let failure = error as? SnapshotFailure { return "'\(path)': snapshot failed: \(failure)" }
        return "\(error)"
    }

    /// ImageCheckFailure carries no file name (simg prints "Check failed: reason"): name it here.
    private static func describe(_ error: any Error, _ path: String) -> String {
        if let failure = error as? ImageCheckFailure {
            return "'\(path)': check failed: errno \(failure.errno)\(failure.message.map { ": " + $0 } ?? "")"
        }
        return "\(error)"
    }

    /// The header of the input file as it is now (after a repair), or nil if it does not parse.
    private func storedHeader() -> QCOW2Header? {
        let count = 1 << Int(QCOW2Header.maxClusterBits)
        var bytes = [UInt8](repeating: 0, count: count)
        let got = bytes.withUnsafeMutableBytes { buffer -> Int in
            // Sound: pread writes at most buffer.count bytes into the buffer.
            pread(inputFD, buffer.baseAddress!, buffer.count, 0)
        }
        var info = stat()
        guard got > 0, fstat(inputFD, &info) == 0 else { return nil }
        return bytes.withUnsafeBytes {
            qcow2Header(UnsafeRawBufferPointer(rebasing: $0[0..<got]), fileSize: UInt64(info.st_size))
        }
    }

    /// Replaces the input file's contents (same inode, so no file is left behind per run).
    private func store(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard ftruncate(inputFD, 0) == 0 else { return false }
        var done = 0
        while done < bytes.count {
            // Sound: done < bytes.count, so the base address is non-nil and the range is inside.
            let n = pwrite(inputFD, bytes.baseAddress! + done, bytes.count - done, off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            done += n
        }
        return true
    }

    /// The qcow2 header as the qcow2 opener parses it (same bytes: the first cluster, zero
    /// padded), or nil when it is not a valid qcow2 header (the opener then fails before
    /// looking at any name).
    private func qcow2Header(_ bytes: UnsafeRawBufferPointer, fileSize: UInt64? = nil) -> QCOW2Header? {
        func prefix(_ count: Int) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: count)
            for i in 0..<min(count, bytes.count) { out[i] = bytes[i] }
            return out
        }
        let start = prefix(112)
        let bits = UInt32(start[20]) << 24 | UInt32(start[21]) << 16 | UInt32(start[22]) << 8 | UInt32(start[23])
        let magic = UInt32(start[0]) << 24 | UInt32(start[1]) << 16 | UInt32(start[2]) << 8 | UInt32(start[3])
        var header = start
        if magic == QCOW2Header.magic, (QCOW2Header.minClusterBits...QCOW2Header.maxClusterBits).contains(bits) {
            header = prefix(1 << Int(bits))
        }
        return try? QCOW2Header.parse(header, fileSize: fileSize ?? UInt64(bytes.count), path: inputPath)
    }

    /// A backing name that resolves inside the folder (relative names are taken against the
    /// image's folder): no "/" and not "." or "..".
    private func isPlainName(_ name: String) -> Bool {
        !name.isEmpty && !name.contains("/") && name != "." && name != ".."
    }

    /// True when opening the header's external data file (by its name, against the current
    /// directory) cannot reach a host file outside the folder.
    private func dataFileIsSafe(_ header: QCOW2Header) -> Bool {
        guard header.hasDataFile, let name = header.dataFileName else { return true }
        var info = stat()
        if stat(name, &info) != 0 { return errno == ENOENT || errno == ENOTDIR }
        guard let resolved = realpath(name, nil) else { return false }
        defer { free(resolved) }
        return String(cString: resolved).hasPrefix(folder + "/")
    }

    /// Opens the input (`format` nil: probed), then info, block status, reads; closes it.
    private func exercise(format: ImageFormat?, followBacking: Bool, _ outcome: inout FuzzHarness.Outcome) {
        let image: any DiskImage
        do {
            image = try ImageOpener.open(inputPath, options: OpenOptions(format: format, openBacking: followBacking))
        } catch {
            outcome.errors.append("\(error)")
            return
        }
        defer {
            do { try image.close() } catch { outcome.errors.append("\(error)") }
        }
        outcome.opened.append(image.format)
        do {
            _ = try image.info()
        } catch {
            outcome.errors.append("\(error)")
        }
        do {
            try walk(image, &outcome)
        } catch {
            outcome.errors.append("\(error)")
        }
    }

    /// Block status from 0 to the end (at most `maxExtents`), reading the start of each extent,
    /// its end, and across its boundary, until the read budget is spent.
    private func walk(_ image: any DiskImage, _ outcome: inout FuzzHarness.Outcome) throws {
        let size = image.virtualSize
        var buffer = [UInt8](repeating: 0, count: FuzzHarness.readChunk)
        var budget = FuzzHarness.readBudget
        var offset: UInt64 = 0
        var count = 0
        func read(at position: UInt64, _ length: UInt64) throws {
            let n = Int(min(length, UInt64(min(budget, buffer.count))))
            guard n > 0 else { return }
            try buffer.withUnsafeMutableBytes {
                try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: position)
            }
            budget -= n
            outcome.bytesRead += n
        }
        while offset < size && count < FuzzHarness.maxExtents {
            let extent = try image.blockStatus(at: offset, length: size - offset)
            guard extent.offset == offset, extent.length > 0, extent.length <= size - offset else {
                throw ImageError(path: image.path, message: "fuzz harness: block status at \(offset) returned \(extent)")
            }
            count += 1
            outcome.extents += 1
            outcome.kinds[image.format, default: []].insert(Self.kindName(extent.kind))
            do {
                try read(at: offset, extent.length)
                if extent.length > UInt64(FuzzHarness.readChunk) {
                    let tail = min(extent.length - UInt64(FuzzHarness.readChunk), 4096)
                    try read(at: extent.end - tail, tail)
                }
                if extent.end < size { try read(at: extent.end - 1, 2) }
            } catch {
                outcome.errors.append("\(error)")
            }
            offset = extent.end
        }
    }

    private static func kindName(_ kind: Extent.Kind) -> String {
        switch kind {
        case .data: return "data"
        case .compressed: return "compressed"
        case .zero: return "zero"
        case .backing: return "backing"
        case .hole: return "hole"
        }
    }
}
