import DiskIO

/// The JSON of a `json:{...}` image name, read as QEMU's parser reads it (qobject_from_json):
/// objects, arrays, strings in double or single quotes, integers and decimals, true, false,
/// null. The result is flattened as QEMU flattens block options (qdict_flatten): nested
/// objects become dotted keys, so `{"file": {"filename": "x"}}` and `{"file.filename": "x"}`
/// mean the same.
enum JSONOptions {
    /// A scalar option value, kept as written (QEMU prints a number as a number and a
    /// quoted number as a string when it regenerates a name).
    enum Value: Equatable {
        case string(String)
        case number(String)
        case bool(Bool)
        case null
    }

    struct ParseError: Error {
        var message: String
    }

    /// The flattened members in the order written. Arrays are kept as a marker value only:
    /// no block option simg supports takes one.
    static func parse(_ text: String) throws(ParseError) -> [(key: String, value: Value?)] {
        var parser = Parser(bytes: FileName.bytes(of: text))
        parser.skipSpace()
        guard parser.peek == UInt8(ascii: "{") else {
            // Valid JSON that is not an object is QEMU's "Invalid JSON object given".
            if (try? parser.value(depth: 0)) != nil, parser.atEndAfterSpace {
                throw ParseError(message: "Invalid JSON object given")
            }
            throw ParseError(message: "Could not parse the JSON options")
        }
        let tree: Node
        do throws(ParseError) {
            tree = try parser.value(depth: 0)
        } catch {
            throw ParseError(message: "Could not parse the JSON options: JSON parse error, \(error.message)")
        }
        guard parser.atEndAfterSpace else {
            throw ParseError(message: "Could not parse the JSON options: Expecting at most one JSON value")
        }
        var flat: [(key: String, value: Value?, nested: Bool)] = []
        flatten(tree, prefix: "", into: &flat)
        // A dotted key and a nested object naming the same option: the nested one wins, as
        // it does in QEMU (`{"file": {"filename": "a"}, "file.filename": "b"}` opens a).
        var seen: [String: Int] = [:]
        var result: [(key: String, value: Value?)] = []
        for member in flat {
            if let at = seen[member.key] {
                if member.nested { result[at].value = member.value }
                continue
            }
            seen[member.key] = result.count
            result.append((member.key, member.value))
        }
        return result
    }

    indirect enum Node {
        case scalar(Value)
        case array
        case object([(String, Node)])
    }

    private static func flatten(_ node: Node, prefix: String,
                                into flat: inout [(key: String, value: Value?, nested: Bool)]) {
        guard case .object(let members) = node else { return }
        for (key, child) in members {
            let name = prefix.isEmpty ? key : prefix + "." + key
            switch child {
            case .scalar(let value): flat.append((name, value, !prefix.isEmpty))
            case .array: flat.append((name, nil, !prefix.isEmpty))
            case .object: flatten(child, prefix: name, into: &flat)
            }
        }
    }

    /// Recursive descent over the bytes; nesting is bounded so that a hostile name cannot
    /// exhaust the stack.
    private struct Parser {
        let bytes: [UInt8]
        var i = 0
        static let maxDepth = 64

        var peek: UInt8? { i < bytes.count ? bytes[i] : nil }

        var atEndAfterSpace: Bool {
            mutating get {
                skipSpace()
                return i == bytes.count
            }
        }

        mutating func skipSpace() {
            while let c = peek, c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D { i += 1 }
        }

        mutating func value(depth: Int) throws(ParseError) -> Node {
            guard depth < Parser.maxDepth else { throw ParseError(message: "too deeply nested") }
            skipSpace()
            guard let c = peek, c != UInt8(ascii: "}"), c != UInt8(ascii: "]") else {
                throw ParseError(message: "expecting value")
            }
            switch c {
            case UInt8(ascii: "{"): return try object(depth: depth)
            case UInt8(ascii: "["): return try array(depth: depth)
            case UInt8(ascii: "\""), UInt8(ascii: "'"): return .scalar(.string(try string()))
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .scalar(.number(try number()))
            default:
                for (word, value) in [("true", Value.bool(true)), ("false", .bool(false)), ("null", .null)]
                where bytes[i...].starts(with: word.utf8) {
                    i += word.utf8.count
                    return .scalar(value)
                }
                throw ParseError(message: "invalid keyword '\(keyword())'")
            }
        }

        private mutating func keyword() -> String {
            let start = i
            while let c = peek, c > 0x20, c != UInt8(ascii: ","), c != UInt8(ascii: "}"), c != UInt8(ascii: "]") { i += 1 }
            return String(decoding: bytes[start..<i], as: UTF8.self)
        }

        private mutating func object(depth: Int) throws(ParseError) -> Node {
            i += 1
            var members: [(String, Node)] = []
            skipSpace()
            if peek == UInt8(ascii: "}") {
                i += 1
                return .object(members)
            }
            while true {
                skipSpace()
                guard peek == UInt8(ascii: "\"") || peek == UInt8(ascii: "'") else {
                    throw ParseError(message: "expecting value")
                }
                let key = try string()
                skipSpace()
                guard peek == UInt8(ascii: ":") else { throw ParseError(message: "expecting ':' after '\(key)'") }
                i += 1
                let child = try value(depth: depth + 1)
                guard !members.contains(where: { $0.0 == key }) else { throw ParseError(message: "duplicate key") }
                members.append((key, child))
                skipSpace()
                if peek == UInt8(ascii: ",") {
                    i += 1
                    continue
                }
                guard peek == UInt8(ascii: "}") else { throw ParseError(message: "expecting ',' or '}'") }
                i += 1
                return .object(members)
            }
        }

        private mutating func array(depth: Int) throws(ParseError) -> Node {
            i += 1
            skipSpace()
            if peek == UInt8(ascii: "]") {
                i += 1
                return .array
            }
            while true {
                _ = try value(depth: depth + 1)
                skipSpace()
                if peek == UInt8(ascii: ",") {
                    i += 1
                    continue
                }
                guard peek == UInt8(ascii: "]") else { throw ParseError(message: "expecting ',' or ']'") }
                i += 1
                return .array
            }
        }

        private mutating func number() throws(ParseError) -> String {
            let start = i
            if peek == UInt8(ascii: "-") { i += 1 }
            let digitsStart = i
            while let c = peek, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) { i += 1 }
            guard i > digitsStart else { throw ParseError(message: "invalid number") }
            while let c = peek, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) || c == UInt8(ascii: ".")
                || c == UInt8(ascii: "e") || c == UInt8(ascii: "E") || c == UInt8(ascii: "+") || c == UInt8(ascii: "-") {
                i += 1
            }
            return String(decoding: bytes[start..<i], as: UTF8.self)
        }

        /// A string in double or single quotes with JSON's escapes (and \' in either).
        /// The bytes between escapes are kept as they are (FileName), so a file name that
        /// is not UTF-8 survives a json: name too.
        private mutating func string() throws(ParseError) -> String {
            let quote = bytes[i]
            i += 1
            var out: [UInt8] = []
            while true {
                guard let c = peek else { throw ParseError(message: "missing closing quote") }
                i += 1
                if c == quote { return FileName.decode(out) }
                guard c == UInt8(ascii: "\\") else {
                    out.append(c)
                    continue
                }
                guard let e = peek else { throw ParseError(message: "missing closing quote") }
                i += 1
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var unit = try hex4()
                    if (0xD800..<0xDC00).contains(unit), bytes[i...].starts(with: "\\u".utf8) {
                        i += 2
                        let low = try hex4()
                        guard (0xDC00..<0xE000).contains(low) else { throw ParseError(message: "invalid surrogate pair") }
                        unit = 0x1_0000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard let scalar = Unicode.Scalar(unit) else { throw ParseError(message: "invalid escape \\u") }
                    out.append(contentsOf: String(scalar).utf8)
                default:
                    throw ParseError(message: "invalid escape sequence in string")
                }
            }
        }

        private mutating func hex4() throws(ParseError) -> UInt32 {
            guard i + 4 <= bytes.count, let value = UInt32(String(decoding: bytes[i..<i + 4], as: UTF8.self), radix: 16) else {
                throw ParseError(message: "invalid escape \\u")
            }
            i += 4
            return value
        }
    }
}
