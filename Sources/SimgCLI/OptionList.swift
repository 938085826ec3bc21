/// qemu-img's `-o name=value,name=value` lists (QemuOpts syntax).
public enum OptionList {
    /// The check qemu-img makes on each `-o` argument before joining it to the others: not
    /// empty, not starting with a comma, and not ending in an odd run of commas (an even run is
    /// escaped commas inside the last value).
    public static func isValid(_ text: String) -> Bool {
        guard let first = text.first, first != "," else { return false }
        let trailingCommas = text.reversed().prefix { $0 == "," }.count
        return trailingCommas % 2 == 0
    }

    /// Several `-o` arguments act as one list joined by commas, in command-line order.
    /// Throws the qemu-img message for the first invalid one.
    public static func join(_ arguments: [String]) throws(CLIError) -> String? {
        for argument in arguments where !isValid(argument) {
            throw CLIError("Invalid option list: \(argument)")
        }
        return arguments.isEmpty ? nil : arguments.joined(separator: ",")
    }

    /// Splits a list into name/value pairs in order. A name runs to the first `=` or `,`; a value
    /// runs to the next single comma, with `,,` standing for a literal comma. A bare `name` means
    /// `name=on` and a bare `noname` means `name=off` (QemuOpts' flag shorthand).
    public static func parse(_ text: String) -> [(name: String, value: String)] {
        entries(text).map { entry in
            if let value = entry.value { return (entry.name, value) }
            if !isHelp(entry.name) && entry.name.hasPrefix("no") { return (String(entry.name.dropFirst(2)), "off") }
            return (entry.name, "on")
        }
    }

    /// `help` or `?` given as a bare name asks for the list of options ("help=1" does not).
    public static func wantsHelp(_ text: String) -> Bool {
        entries(text).contains { $0.value == nil && isHelp($0.name) }
    }

    /// The raw entries; `value` is nil for a bare name.
    static func entries(_ text: String) -> [(name: String, value: String?)] {
        var result: [(name: String, value: String?)] = []
        let chars = Array(text)
        var i = 0
        while i < chars.count {
            var name = ""
            while i < chars.count && chars[i] != "=" && chars[i] != "," {
                name.append(chars[i])
                i += 1
            }
            guard i < chars.count && chars[i] == "=" else {
                result.append((name, nil))
                i += 1  // the separating comma
                continue
            }
            i += 1
            var value = ""
            while i < chars.count {
                if chars[i] == "," {
                    guard i + 1 < chars.count && chars[i + 1] == "," else { break }
                    i += 1  // ",," is one literal comma
                }
                value.append(chars[i])
                i += 1
            }
            result.append((name, value))
            i += 1  // the separating comma
        }
        return result
    }

    static func isHelp(_ name: String) -> Bool { name == "help" || name == "?" }
}
