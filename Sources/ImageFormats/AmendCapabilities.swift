/// What `amend` asks of an image (qemu-img amend): asked with `as? AmendableImage`, never by
/// format name. A format without it (raw) is refused by the command with QEMU's words, and
/// its driver lists no amend options.

/// One option given to amend, its value already checked against the option's type (as
/// QemuOpts parses it): a string, a boolean, a number or a size.
public enum AmendValue: Equatable, Sendable {
    case string(String)
    case bool(Bool)
    case number(UInt64)
    case size(UInt64)
}

/// The options of one amend, by name (the last of a repeated option wins, as qemu_opt_get).
public struct AmendRequest: Sendable {
    public var values: [String: AmendValue]
    /// `--force` (QEMU passes it on for LUKS key slot changes; qcow2 itself ignores it).
    public var force: Bool
    /// The driver's progress, as QEMU's amend status callback reports it: (work done, total
    /// work) in the driver's own units, at the points QEMU's driver reports (qemu-img amend -p
    /// prints 100 * done / total). Nil: nobody asks.
    public var progress: (@Sendable (UInt64, UInt64) -> Void)?

    public init(values: [String: AmendValue], force: Bool, progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) {
        self.values = values
        self.force = force
        self.progress = progress
    }

    public func string(_ name: String) -> String? {
        if case .string(let v)? = values[name] { return v }
        return nil
    }
    public func bool(_ name: String) -> Bool? {
        if case .bool(let v)? = values[name] { return v }
        return nil
    }
    public func number(_ name: String) -> UInt64? {
        switch values[name] {
        case .number(let v)?, .size(let v)?: return v
        default: return nil
        }
    }
    public func has(_ name: String) -> Bool { values[name] != nil }
}

/// An amend refused or failed, worded as QEMU's driver words it (printed after "simg: ";
/// a second line, QEMU's hint, follows the message after a newline).
public struct AmendError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public protocol AmendableImage: DiskImage {
    /// Applies `request` in QEMU's order (checks, upgrade, refcount width, data file fields,
    /// backing file check, lazy refcounts, size, downgrade). Each step is crash-safe on its
    /// own: a kill leaves the image as before or after that step.
    func amend(_ request: AmendRequest) throws
}

/// A driver's amend option table (internal: drivers are), and the public questions the
/// command asks of a format by name.
protocol AmendableFormat {
    /// The options `amend -o` takes, in the order `-o help` lists them.
    var amendOptions: [CreateOptionSpec] { get }
}

public enum AmendOptions {
    /// The amend options of `format` (nil: the format cannot be amended).
    public static func table(for format: ImageFormat) -> [CreateOptionSpec]? {
        (format.driver as? any AmendableFormat)?.amendOptions
    }

    /// `format`'s creation option `name`, if it has one: amend adds QEMU's hint "This option
    /// is only supported for image creation" when an option it does not take is one of them
    /// (and its value is of the creation option's type).
    public static func creationOption(_ name: String, format: ImageFormat) -> CreateOptionSpec? {
        format.driver.createOptions.first { $0.name == name }
    }
}
