import DiskIO

/// What a format can do beyond being read and written, so commands ask the driver instead of
/// naming formats.
public struct FormatCapabilities: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// A consistency check (`simg check`); without it check exits 63, as qemu-img does.
    public static let check = FormatCapabilities(rawValue: 1 << 0)
    /// Images of the format can name a backing file (create -b, convert -B, rebase).
    public static let backingFiles = FormatCapabilities(rawValue: 1 << 1)
    /// Compressed clusters can be written (convert -c).
    public static let compressedWrites = FormatCapabilities(rawValue: 1 << 2)
    /// Internal snapshots.
    public static let snapshots = FormatCapabilities(rawValue: 1 << 3)
    /// Takes raw's `offset`/`size` options (a window of the file); other formats refuse them.
    public static let windows = FormatCapabilities(rawValue: 1 << 4)
}

/// One image to create: the generic checks (size, backing file, protocol) are done and the
/// options parsed against the driver's table; the driver writes the image.
struct FormatCreateJob {
    /// The file (or device) to create, a plain name.
    var path: String
    var size: UInt64
    var options: ParsedCreateOptions
    /// The target is a block or character device (QEMU's host_device protocol).
    var onDevice: Bool
    /// Every file the driver creates is recorded here; a failure removes exactly those.
    var created: CreatedFiles
    /// The cache mode of the new files (`CreateRequest.cache`): unsafe syncs nothing.
    var cache: CacheMode
}

/// A format driver: its name, how it recognises, opens and creates images, and what else it
/// can do. Each format's folder has one; `FormatRegistry` holds them. Adding a format is its
/// folder plus one line in `FormatRegistry.builtIn`.
protocol FormatDriver: Sendable {
    /// QEMU's name for the format ("raw", "qcow2", ...).
    var name: String { get }
    var capabilities: FormatCapabilities { get }
    /// How sure the driver is that `header` (the file's first bytes, up to 512, zero-padded)
    /// starts an image of its format, as QEMU's probe scores: 0 for not at all, 100 for a
    /// magic. raw never claims a file: it is what no driver claims.
    func probe(header: [UInt8]) -> Int
    /// Opens one image (not its backing file) on `file`, the file `location` names, which the
    /// opener has opened once with the access and cache mode asked for (and probed from; the
    /// image opens any other file it consists of with `file.cache` too).
    /// `header` is the file's first bytes as the probe read them (up to 512, zero-padded past
    /// the end of the file), nil when there was no probe. On success the image owns `file`;
    /// on failure the caller still owns it and closes it.
    func open(file: DiskFile, location: ImageLocation, header: [UInt8]?, writable: Bool) throws -> any DiskImage
    /// What a failure to open the file `location` names (an IOError) is thrown as: by default
    /// an ImageError "could not open the image file" naming the image, with the IOError as cause.
    func openFailure(_ error: any Error, location: ImageLocation) -> any Error
    /// The format's `-o` options, in QEMU's order, before the protocol's.
    var createOptions: [CreateOptionSpec] { get }
    /// Writes a new image; errors are ImageErrors about `job.path`.
    func create(_ job: FormatCreateJob) throws
    /// What a new image of the format would need (`simg measure`, Measure.swift); by default
    /// QEMU's refusal for a driver without measurement.
    func measure(_ job: FormatMeasureJob) throws -> MeasureResult
    /// Checks and repairs the image open as `file` (only with `.check`).
    func check(file: DiskFile, path: String, repair: CheckRepair, report: @escaping (String) -> Void,
               reportError: @escaping (String) -> Void) throws -> ImageCheckResult
}

extension FormatDriver {
    func openFailure(_ error: any Error, location: ImageLocation) -> any Error {
        ImageError(path: location.name, message: "could not open the image file", cause: error)
    }

    /// Opens the file `location` names itself (failures as `openFailure` words them), then
    /// the image on it: for an image opened without the opener's probe.
    func open(location: ImageLocation, writable: Bool, cache: CacheMode) throws -> any DiskImage {
        let file: DiskFile
        do {
            file = try DiskFile.open(location.path, access: writable ? .readWrite : .readOnly, cache: cache)
        } catch {
            throw openFailure(error, location: location)
        }
        do {
            return try open(file: file, location: location, header: nil, writable: writable)
        } catch {
            file.close()
            throw error
        }
    }

    func check(file: DiskFile, path: String, repair: CheckRepair, report: @escaping (String) -> Void,
               reportError: @escaping (String) -> Void) throws -> ImageCheckResult {
        throw ImageError(path: path, message: "This image format does not support checks")
    }
}

/// The format drivers simg has, in the order they are probed (raw, which claims nothing,
/// last).
enum FormatRegistry {
    /// The formats every simg has.
    static let builtIn: [any FormatDriver] = [QCOW2Driver(), RawDriver()]

    /// Drivers added for the current task (tests plug formats in this way, each seeing only
    /// its own: nothing global changes).
    @TaskLocal static var added: [any FormatDriver] = []

    static var all: [any FormatDriver] {
        let extra = added
        guard !extra.isEmpty else { return builtIn }
        return builtIn.dropLast().filter { d in !extra.contains { $0.name == d.name } } + extra + builtIn.suffix(1)
    }

    static func driver(named name: String) -> (any FormatDriver)? {
        all.first { $0.name == name }
    }

    /// Runs `body` with `drivers` registered as well (a driver of the same name replaces
    /// the built-in one).
    static func with<R>(_ drivers: [any FormatDriver], _ body: () throws -> R) rethrows -> R {
        try $added.withValue(added + drivers, operation: body)
    }

    /// The registered driver claiming `header` most surely, if any does.
    static func probe(header: [UInt8]) -> (any FormatDriver)? {
        var best: (driver: any FormatDriver, score: Int)?
        for driver in all {
            let score = driver.probe(header: header)
            if score > 0 && score > (best?.score ?? 0) { best = (driver, score) }
        }
        return best?.driver
    }
}
