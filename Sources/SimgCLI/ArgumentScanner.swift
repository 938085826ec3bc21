/// A getopt_long-style command line scanner, as qemu-img's commands use it: short options
/// (`-f qcow2`, `-fqcow2`, clustered flags `-qU`, `-Uf qcow2`), long options (`--output=json`,
/// `--output json`, unambiguous prefixes such as `--back`), `--` to end the options, and GNU
/// permutation (options and operands may be interleaved; operands keep their order).

/// One option a command accepts.
public struct OptionSpec: Sendable, Equatable {
    /// The single-letter form (`f` for `-f`), if any.
    public var short: Character?
    /// The long form without dashes (`output` for `--output`), if any.
    public var long: String?
    /// Whether the option takes a value.
    public var takesValue: Bool
    /// The name results are stored under.
    public var key: String
    /// Scanning stops at this option (help): what follows is not checked.
    public var stops: Bool

    public init(short: Character? = nil, long: String? = nil, takesValue: Bool = false,
                key: String, stops: Bool = false) {
        self.short = short
        self.long = long
        self.takesValue = takesValue
        self.key = key
        self.stops = stops
    }

    /// A flag: `-q`.
    public static func flag(_ short: Character, _ key: String) -> OptionSpec {
        OptionSpec(short: short, key: key)
    }

    /// A short option with a value: `-f fmt`.
    public static func value(_ short: Character, _ key: String) -> OptionSpec {
        OptionSpec(short: short, takesValue: true, key: key)
    }

    /// A long-only option: `--backing-chain`, `--output=ofmt`.
    public static func long(_ name: String, takesValue: Bool = false) -> OptionSpec {
        OptionSpec(long: name, takesValue: takesValue, key: name)
    }

    /// `-h` / `--help`, which every command accepts.
    public static let help = OptionSpec(short: "h", long: "help", key: "help", stops: true)
}

/// One option as found on the command line.
public struct ScannedOption: Equatable, Sendable {
    public var key: String
    public var value: String?
}

/// What the scanner found: the options in command-line order and the operands.
public struct ScanResult: Equatable, Sendable {
    public var options: [ScannedOption] = []
    public var operands: [String] = []

    public init(options: [ScannedOption] = [], operands: [String] = []) {
        self.options = options
        self.operands = operands
    }

    public func has(_ key: String) -> Bool { options.contains { $0.key == key } }

    /// Every value given for `key`, in order (`-o a -o b`).
    public func values(_ key: String) -> [String] {
        options.compactMap { $0.key == key ? $0.value : nil }
    }

    /// The last value given for `key`: as with getopt loops, a later option overrides.
    public func last(_ key: String) -> String? { values(key).last }
}

/// A command-line mistake. The messages are qemu-img's (which prints the whole argument word,
/// e.g. '-qz' when 'z' is unknown), followed by a hint to run --help.
public enum ScanError: Error, Equatable, Sendable {
    case unrecognized(String)
    case missingValue(String)

    public var message: String {
        switch self {
        case .unrecognized(let word): return "unrecognized option '\(word)'"
        case .missingValue(let word): return "missing argument for option '\(word)'"
        }
    }
}

public struct ArgumentScanner: Sendable {
    public var specs: [OptionSpec]
    /// Stop at the first operand instead of permuting (the global options before the command).
    public var stopAtOperand: Bool

    public init(_ specs: [OptionSpec], stopAtOperand: Bool = false) {
        self.specs = specs
        self.stopAtOperand = stopAtOperand
    }

    public func scan(_ arguments: [String]) throws(ScanError) -> ScanResult {
        var result = ScanResult()
        var index = 0
        while index < arguments.count {
            let word = arguments[index]
            index += 1
            if word == "--" {
                result.operands += arguments[index...]
                break
            }
            if word.hasPrefix("--") {
                let option = try scanLong(word, arguments, &index)
                result.options.append(option)
                if stopsScan(option) { break }
            } else if word.hasPrefix("-") && word.count > 1 {
                let stop = try scanShortCluster(word, arguments, &index, into: &result)
                if stop { break }
            } else if stopAtOperand {
                result.operands += arguments[(index - 1)...]
                break
            } else {
                result.operands.append(word)
            }
        }
        return result
    }

    private func stopsScan(_ option: ScannedOption) -> Bool {
        specs.contains { $0.key == option.key && $0.stops }
    }

    /// `--name`, `--name=value`, `--name value`; `name` may be an unambiguous prefix.
    private func scanLong(_ word: String, _ arguments: [String], _ index: inout Int)
        throws(ScanError) -> ScannedOption
    {
        let body = word.dropFirst(2)
        let name: Substring
        let attached: Substring?
        if let equals = body.firstIndex(of: "=") {
            name = body[..<equals]
            attached = body[body.index(after: equals)...]
        } else {
            name = body
            attached = nil
        }
        guard let spec = findLong(name) else { throw .unrecognized(word) }
        if !spec.takesValue {
            // getopt rejects a value on a flag; qemu-img reports that as unrecognized.
            if attached != nil { throw .unrecognized(word) }
            return ScannedOption(key: spec.key, value: nil)
        }
        if let attached { return ScannedOption(key: spec.key, value: String(attached)) }
        guard index < arguments.count else { throw .missingValue(word) }
        index += 1
        return ScannedOption(key: spec.key, value: arguments[index - 1])
    }

    /// Exact name first, else the one long option the prefix abbreviates (GNU getopt_long).
    private func findLong(_ name: Substring) -> OptionSpec? {
        guard !name.isEmpty else { return nil }
        if let exact = specs.first(where: { $0.long.map { $0[...] == name } ?? false }) { return exact }
        let candidates = specs.filter { $0.long?.hasPrefix(name) ?? false }
        guard let first = candidates.first else { return nil }
        // Several long names sharing one meaning are not ambiguous.
        return candidates.allSatisfy({ $0.key == first.key && $0.takesValue == first.takesValue }) ? first : nil
    }

    /// `-q`, `-qU`, `-fqcow2`, `-f qcow2`, `-Uf qcow2`. Returns true when scanning must stop.
    private func scanShortCluster(_ word: String, _ arguments: [String], _ index: inout Int,
                                  into result: inout ScanResult) throws(ScanError) -> Bool {
        var rest = word.dropFirst()
        while let letter = rest.first {
            rest = rest.dropFirst()
            guard let spec = specs.first(where: { $0.short == letter }) else { throw .unrecognized(word) }
            if spec.takesValue {
                if !rest.isEmpty {
                    result.options.append(ScannedOption(key: spec.key, value: String(rest)))
                } else if index < arguments.count {
                    result.options.append(ScannedOption(key: spec.key, value: arguments[index]))
                    index += 1
                } else {
                    throw .missingValue(word)
                }
                return spec.stops
            }
            result.options.append(ScannedOption(key: spec.key, value: nil))
            if spec.stops { return true }
        }
        return false
    }
}
