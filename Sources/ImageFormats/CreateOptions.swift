import DiskIO

/// The `-o` options of `create`, as qemu-img 7.2 defines them: names, types, help text,
/// how their values are parsed, and how the "Formatting ..." line prints them.

/// One creation option as `qemu-img create -f FMT -o help` lists it.
public struct CreateOptionSpec: Sendable, Equatable {
    public let name: String
    /// "bool", "size", "number" or "string".
    public let type: String
    public let help: String
    /// Printed when the option is not given (QEMU's def_value_str), e.g. "65536" for cluster_size.
    public let defaultValue: String?

    public init(name: String, type: String, help: String, defaultValue: String? = nil) {
        self.name = name
        self.type = type
        self.help = help
        self.defaultValue = defaultValue
    }

    /// The type as qemu-img's help shows it between < and >: "str", "size", "num", "bool (on/off)".
    public var helpType: String {
        switch type {
        case "bool": return "bool (on/off)"
        case "number": return "num"
        case "string": return "str"
        default: return type
        }
    }
}

/// One `-o name=value` pair, in command line order.
public struct CreateOption: Sendable, Equatable {
    public var name: String
    public var value: String

    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// Everything `create` was asked to do.
public struct CreateRequest: Sendable {
    public var format: ImageFormat
    public var path: String
    /// The size argument, nil when not given (it may then come from `-o size=` or the backing file).
    public var size: UInt64?
    /// The `-o` options in order (a later value of the same name wins).
    public var options: [CreateOption]
    /// `-b`, which overrides `-o backing_file=`.
    public var backingFile: String?
    /// `-F`, which overrides `-o backing_fmt=`.
    public var backingFormat: String?
    /// `-u`: do not open the backing file.
    public var unsafeBacking: Bool
    /// The cache mode of the new files' flushes (they are written through the page cache
    /// whatever the mode: `cache.buffered`). convert's create step takes its `-t`; with unsafe
    /// (QEMU's cache.no-flush) the new files are never synced. The header still goes last,
    /// after everything else has been written, so a kill leaves the same as with syncs; only
    /// power loss is no longer waited out.
    public var cache: CacheMode = .writeback

    public init(format: ImageFormat, path: String, size: UInt64? = nil, options: [CreateOption] = [],
                backingFile: String? = nil, backingFormat: String? = nil, unsafeBacking: Bool = false) {
        self.format = format
        self.path = path
        self.size = size
        self.options = options
        self.backingFile = backingFile
        self.backingFormat = backingFormat
        self.unsafeBacking = unsafeBacking
    }

    /// Convenience for callers holding (name, value) tuples.
    public init(format: ImageFormat, path: String, size: UInt64?, options: [(name: String, value: String)],
                backingFile: String?, backingFormat: String?, unsafeBacking: Bool) {
        self.init(format: format, path: path, size: size,
                  options: options.map { CreateOption(name: $0.name, value: $0.value) },
                  backingFile: backingFile, backingFormat: backingFormat, unsafeBacking: unsafeBacking)
    }
}

enum CreateOptionTables {
    static let size = CreateOptionSpec(name: "size", type: "size", help: "Virtual disk size")

    /// qcow2's own options, in QEMU's declaration order (the order "Formatting ..." prints).
    static let qcow2: [CreateOptionSpec] = [
        CreateOptionSpec(name: "encryption", type: "bool",
                         help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        CreateOptionSpec(name: "encrypt.format", type: "string",
                         help: "Encrypt the image, format choices: 'aes', 'luks'"),
        CreateOptionSpec(name: "encrypt.key-secret", type: "string",
                         help: "ID of secret providing qcow AES key or LUKS passphrase"),
        CreateOptionSpec(name: "encrypt.cipher-alg", type: "string", help: "Name of encryption cipher algorithm"),
        CreateOptionSpec(name: "encrypt.cipher-mode", type: "string", help: "Name of encryption cipher mode"),
        CreateOptionSpec(name: "encrypt.ivgen-alg", type: "string", help: "Name of IV generator algorithm"),
        CreateOptionSpec(name: "encrypt.ivgen-hash-alg", type: "string", help: "Name of IV generator hash algorithm"),
        CreateOptionSpec(name: "encrypt.hash-alg", type: "string", help: "Name of encryption hash algorithm"),
        CreateOptionSpec(name: "encrypt.iter-time", type: "number", help: "Time to spend in PBKDF in milliseconds"),
        CreateOptionSpec(name: "cluster_size", type: "size", help: "qcow2 cluster size", defaultValue: "65536"),
        CreateOptionSpec(name: "extended_l2", type: "bool", help: "Extended L2 tables", defaultValue: "off"),
        CreateOptionSpec(name: "preallocation", type: "string",
                         help: "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        CreateOptionSpec(name: "compression_type", type: "string",
                         help: "Compression method used for image cluster compression", defaultValue: "zlib"),
        size,
        CreateOptionSpec(name: "compat", type: "string", help: "Compatibility level (v2 [0.10] or v3 [1.1])"),
        CreateOptionSpec(name: "backing_file", type: "string", help: "File name of a base image"),
        CreateOptionSpec(name: "backing_fmt", type: "string", help: "Image format of the base image"),
        CreateOptionSpec(name: "data_file", type: "string", help: "File name of an external data file"),
        CreateOptionSpec(name: "data_file_raw", type: "bool",
                         help: "The external data file must stay valid as a raw image"),
        CreateOptionSpec(name: "lazy_refcounts", type: "bool", help: "Postpone refcount updates", defaultValue: "off"),
        CreateOptionSpec(name: "refcount_bits", type: "number", help: "Width of a reference count entry in bits",
                         defaultValue: "16"),
    ]

    /// The file protocol's options, in declaration order; qemu-img appends those a format does
    /// not already have.
    static let file: [CreateOptionSpec] = [
        size,
        CreateOptionSpec(name: "nocow", type: "bool", help: "Turn off copy-on-write (valid only on btrfs)"),
        CreateOptionSpec(name: "preallocation", type: "string",
                         help: "Preallocation mode (allowed values: off, falloc, full)"),
        CreateOptionSpec(name: "extent_size_hint", type: "size",
                         help: "Extent size hint for the image file, 0 to disable"),
    ]

    /// The host_device protocol's options (QEMU's bdrv_create_opts_simple): what a block or
    /// character device takes instead of the file protocol's.
    static let hostDevice: [CreateOptionSpec] = [
        size,
        CreateOptionSpec(name: "preallocation", type: "string", help: "Preallocation mode (allowed values: off)"),
    ]

    static func format(_ format: ImageFormat) -> [CreateOptionSpec] { format.driver.createOptions }

    /// Format options followed by the protocol options the format does not define, in the
    /// order qemu-img prints the "Formatting ..." line.
    static func merged(_ format: ImageFormat, protocol: CreateProtocol = .file) -> [CreateOptionSpec] {
        var list = self.format(format)
        for spec in (`protocol` == .file ? file : hostDevice) where !list.contains(where: { $0.name == spec.name }) {
            list.append(spec)
        }
        return list
    }
}

extension ImageCreator {
    /// The options `qemu-img create -f FORMAT -o help` lists, sorted by name as it prints them.
    /// With `includeProtocol`, also the file protocol's options (what qemu-img lists when a
    /// file name is given: nocow, extent_size_hint, and for raw, preallocation).
    /// `protocol`: which protocol's options (a device target takes host_device's).
    public static func optionSpecs(for format: ImageFormat, includeProtocol: Bool = false,
                                   protocol: CreateProtocol = .file) -> [CreateOptionSpec] {
        let list = includeProtocol ? CreateOptionTables.merged(format, protocol: `protocol`) : CreateOptionTables.format(format)
        return list.sorted { $0.name < $1.name }
    }
}

/// The protocol layer a new image is created through, which decides the options beyond the
/// format's: QEMU picks host_device for a name that leads to a block or character device
/// (hdev_probe_device stats it, following links), else the file protocol.
public enum CreateProtocol: Sendable, Equatable {
    case file, hostDevice

    public init(path: String) {
        self = FileKind(path: path)?.isDevice == true ? .hostDevice : .file
    }
}

/// A parsed `-o` value.
enum CreateOptionValue: Equatable {
    case bool(Bool, text: String)
    case size(UInt64)
    case number(UInt64)
    case string(String)

    /// How qemu_opts_print shows a set option: sizes and numbers as signed 64-bit decimals,
    /// strings with ',' doubled, booleans as typed.
    var printed: String {
        switch self {
        case .bool(_, let text): return text
        case .size(let v), .number(let v): return String(Int64(bitPattern: v))
        case .string(let s): return s.replacingAll(",", with: ",,")
        }
    }
}

/// The `-o` values after type checking: the last value of each name wins.
struct ParsedCreateOptions {
    var specs: [CreateOptionSpec]
    var values: [String: CreateOptionValue] = [:]
    /// Warnings qemu-img would print (hex numbers with a suffix).
    var warnings: [String] = []

    init(format: ImageFormat, protocol: CreateProtocol = .file) {
        specs = CreateOptionTables.merged(format, protocol: `protocol`)
    }

    /// Parses one option; errors are the messages qemu-img prints after "file: ".
    mutating func set(_ name: String, _ text: String) throws(CreateOptionError) {
        guard let spec = specs.first(where: { $0.name == name }) else {
            throw CreateOptionError("Invalid parameter '\(name)'", kind: .invalidParameter)
        }
        switch spec.type {
        case "bool":
            switch text {
            case "on", "yes", "true", "y": values[name] = .bool(true, text: text)
            case "off", "no", "false", "n": values[name] = .bool(false, text: text)
            default: throw CreateOptionError("Parameter '\(name)' expects 'on' or 'off'")
            }
        case "size":
            do {
                let parsed = try SizeParser.parseDetailed(text)
                if parsed.usedHexSuffix {
                    warnings.append(SizeParser.hexSuffixWarning(text))
                }
                values[name] = .size(parsed.value)
            } catch {
                throw CreateOptionError(SizeParser.parameterMessage(for: error, text: text, parameter: name))
            }
        case "number":
            do {
                values[name] = .number(try SizeParser.parseNumber(text))
            } catch SizeParser.Error.outOfRange {
                throw CreateOptionError("Value '\(text)' is too large for parameter '\(name)'")
            } catch {
                throw CreateOptionError("Parameter '\(name)' expects a number")
            }
        default:
            values[name] = .string(text)
        }
    }

    func string(_ name: String) -> String? {
        if case .string(let s) = values[name] { return s }
        return nil
    }

    func bool(_ name: String) -> Bool? {
        if case .bool(let b, _) = values[name] { return b }
        return nil
    }

    func unsigned(_ name: String) -> UInt64? {
        switch values[name] {
        case .size(let v), .number(let v): return v
        default: return nil
        }
    }

    func isSet(_ name: String) -> Bool { values[name] != nil }

    /// The text after "fmt=FORMAT " in qemu-img's "Formatting ..." line.
    var printed: String {
        var parts: [String] = []
        for spec in specs {
            if let value = values[spec.name] {
                parts.append("\(spec.name)=\(value.printed)")
            } else if let value = spec.defaultValue {
                parts.append("\(spec.name)=\(value)")
            }
        }
        return parts.joined(separator: " ")
    }
}

struct CreateOptionError: Error {
    var message: String
    /// `.invalidParameter` for an option the format does not have (qemu-img convert says only
    /// that, naming no file); a bad value for an option it has is `.general`.
    var kind: ImageError.Kind
    init(_ message: String, kind: ImageError.Kind = .general) {
        self.message = message
        self.kind = kind
    }
}

extension String {
    /// Replaces every occurrence of `target` (Glibc-only code has no Foundation).
    func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        for c in self {
            if c == target { out += replacement } else { out.append(c) }
        }
        return out
    }
}
