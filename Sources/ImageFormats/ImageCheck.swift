import DiskIO

/// What a consistency check found (QEMU's BdrvCheckResult with its block fragmentation info),
/// the numbers `simg check` prints.
public struct ImageCheckResult: Equatable, Sendable {
    /// Problems that stopped parts of the check (I/O errors, allocation failures).
    public var checkErrors: Int64 = 0
    public var corruptions: Int64 = 0
    public var leaks: Int64 = 0
    public var corruptionsFixed: Int64 = 0
    public var leaksFixed: Int64 = 0
    /// One byte past the last cluster in use (0 when unknown).
    public var imageEndOffset: UInt64 = 0
    /// Guest clusters of the virtual disk.
    public var totalClusters: Int64 = 0
    public var allocatedClusters: Int64 = 0
    public var fragmentedClusters: Int64 = 0
    public var compressedClusters: Int64 = 0

    public init() {}
}

/// How much a check may repair (qemu-img check -r).
public enum CheckRepair: String, Sendable {
    case none
    /// -r leaks: free clusters that are counted but not used.
    case leaks
    /// -r all: also corruptions.
    case all

    var fixesLeaks: Bool { self != .none }
    var fixesErrors: Bool { self == .all }
}

/// A check that could not run to its end: `errno` is the reason as QEMU returns it
/// (qemu-img prints "Check failed: strerror(errno)"), `result` what was counted so far.
public struct ImageCheckFailure: Error {
    public var errno: Int32
    public var result: ImageCheckResult
    /// What qemu-img reports as an error of its own before "Check failed" (e.g. "ERROR
    /// writing refblock: Input/output error"), if anything.
    public var message: String?

    public init(errno: Int32, result: ImageCheckResult, message: String? = nil) {
        self.errno = errno
        self.result = result
        self.message = message
    }
}

/// Format-neutral entry point of `simg check`.
public enum ImageChecker {
    /// True when the format has a consistency check (raw has none: qemu-img exits 63).
    public static func supportsCheck(_ format: ImageFormat) -> Bool { format.capabilities.contains(.check) }

    /// Checks (and with `repair`, repairs) the image file `path`, which must be of a format
    /// that `supportsCheck`. `report` gets each line QEMU writes to stderr while checking
    /// ("Leaked cluster ...", "ERROR ...", "Repairing ..."), with its newline; `reportError`
    /// gets the few messages qemu-img prints as its own errors ("qemu-img: MESSAGE"), without
    /// prefix or newline.
    /// Opening errors are thrown as ImageError/IOError; a check that could not complete
    /// throws ImageCheckFailure.
    public static func check(path: String, format: ImageFormat, repair: CheckRepair,
                             report: @escaping (String) -> Void,
                             reportError: @escaping (String) -> Void = { _ in }) throws -> ImageCheckResult {
        let file = try DiskFile.open(ImageName.filePath(of: path), access: .readOnly)
        defer { file.close() }
        return try check(file: file, path: path, format: format, repair: repair, report: report,
                         reportError: reportError)
    }

    /// The same on the image file already open as `file` (the descriptor holding the image's
    /// locks): the check reads and repairs through a reopen of that very file, never the name
    /// opened again, so a rename or a new file under the name meanwhile cannot redirect a
    /// repair. `path` is the name messages use.
    public static func check(file: DiskFile, path: String, format: ImageFormat, repair: CheckRepair,
                             report: @escaping (String) -> Void,
                             reportError: @escaping (String) -> Void = { _ in }) throws -> ImageCheckResult {
        guard supportsCheck(format) else {
            throw ImageError(path: path, message: "This image format does not support checks")
        }
        let own = try file.reopen(access: repair == .none ? .readOnly : .readWrite, cache: .writeback)
        defer { own.close() }
        return try format.driver.check(file: own, path: path, repair: repair, report: report,
                                       reportError: reportError)
    }
}
