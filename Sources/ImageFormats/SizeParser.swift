/// Parses sizes the way qemu-img 7.2 does (QEMU's qemu_strtosz): the image size argument of
/// `create`, and size-typed `-o` values such as `cluster_size=64k`.
///
/// Rules (checked against the real qemu-img):
/// - optional leading whitespace and `+`; any `-` is refused;
/// - decimal digits (`010` is ten, not octal), or hexadecimal `0x...` (no fraction allowed;
///   a suffix after hex is accepted but deprecated: `hexSuffixWarning` says so);
/// - an optional fraction `.ddd` (no exponent), which needs a suffix other than `B`;
///   the result is rounded half up to a whole byte;
/// - an optional one-letter suffix: `B`/`b` bytes, `k`/`K`, `M`/`m`, `G`/`g`, `T`/`t`,
///   `P`/`p`, `E`/`e` (powers of 1024); nothing may follow it (`1kb`, `1KiB` are refused);
/// - values of 2^64 and above are out of range.
public enum SizeParser {
    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        /// Not a size at all.
        case invalid(String)
        /// A size, but too large (2^64 or more for `parse`, above INT64_MAX for `parseImageSize`).
        case outOfRange(String)

        public var description: String {
            switch self {
            case .invalid(let text): return "'\(text)' is not a valid size"
            case .outOfRange(let text): return "size '\(text)' is out of range"
            }
        }
    }

    /// A parsed size; `usedHexSuffix` is true for inputs like `0x10k` that qemu-img accepts
    /// with the warning "Using a multiplier suffix on hex numbers is deprecated: 0x10k".
    public struct Parsed: Equatable, Sendable {
        public var value: UInt64
        public var usedHexSuffix: Bool
    }

    /// Any size below 2^64.
    public static func parse(_ text: String) throws -> UInt64 {
        try parseDetailed(text).value
    }

    /// An image size: at most INT64_MAX (qemu-img's limit for `create`'s size argument).
    public static func parseImageSize(_ text: String) throws -> UInt64 {
        let value = try parse(text)
        guard value <= UInt64(Int64.max) else { throw Error.outOfRange(text) }
        return value
    }

    /// qemu's words for a size option value (`-o size=`, resize's SIZE) that `error`, thrown
    /// parsing `text`, rejected: out of range, or not a size at all.
    public static func parameterMessage(for error: any Swift.Error, text: String, parameter: String) -> String {
        if case Error.outOfRange? = error as? Error {
            return "Value '\(text)' is out of range for parameter '\(parameter)'"
        }
        return """
            Parameter '\(parameter)' expects a non-negative number below 2^64
            Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-
            and exabytes, respectively.
            """
    }

    /// The warning qemu-img prints for a hex number with a suffix.
    public static func hexSuffixWarning(_ text: String) -> String {
        "Using a multiplier suffix on hex numbers is deprecated: \(text)"
    }

    public static func parseDetailed(_ text: String) throws -> Parsed {
        let bytes = Array(text.utf8)
        var i = 0
        // strtoull skips leading white space and takes one sign.
        while i < bytes.count, isSpace(bytes[i]) { i += 1 }
        if i < bytes.count, bytes[i] == UInt8(ascii: "-") { throw Error.invalid(text) }
        if i < bytes.count, bytes[i] == UInt8(ascii: "+") { i += 1 }

        let digitsStart = i
        var value: UInt64 = 0
        var overflow = false
        while i < bytes.count, let d = decimalDigit(bytes[i]) {
            let (m, o1) = value.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(d))
            overflow = overflow || o1 || o2
            value = s
            i += 1
        }
        guard i > digitsStart else { throw Error.invalid(text) }

        var fraction: UInt64 = 0  // 0.64 fixed point
        var hex = false
        if value == 0, i == digitsStart + 1, i < bytes.count,
           bytes[i] == UInt8(ascii: "x") || bytes[i] == UInt8(ascii: "X") {
            // Reparse as hexadecimal from the digits' start: "0x" then hex digits.
            var j = i + 1
            var hexValue: UInt64 = 0
            while j < bytes.count, let d = hexDigit(bytes[j]) {
                if hexValue >> 60 != 0 { overflow = true }
                hexValue = hexValue << 4 | UInt64(d)
                j += 1
            }
            if j == i + 1 {
                // strtoull parsed only the "0"; the "x" is then trailing garbage.
                throw Error.invalid(text)
            }
            if overflow { throw Error.outOfRange(text) }
            if j < bytes.count, bytes[j] == UInt8(ascii: ".") { throw Error.invalid(text) }
            value = hexValue
            i = j
            hex = true
        } else if i < bytes.count, bytes[i] == UInt8(ascii: ".") {
            // A fraction: digits after the point (none is fine: "5.k"); an exponent is refused.
            var j = i + 1
            while j < bytes.count, decimalDigit(bytes[j]) != nil { j += 1 }
            if j > i + 1 {
                if j < bytes.count, bytes[j] == UInt8(ascii: "e") || bytes[j] == UInt8(ascii: "E"),
                   exponentFollows(bytes, after: j) {
                    throw Error.invalid(text)
                }
                let digits = String(decoding: bytes[i..<j], as: UTF8.self)
                let f = Double("0" + digits) ?? 0
                let scaled = f * 18446744073709551616.0  // 2^64
                // A fraction that rounds to 1.0 does not fit 0.64 fixed point; QEMU's
                // conversion then yields 0 on x86-64 (1.9999999999999999999k is 1024 there).
                fraction = scaled >= 18446744073709551616.0 ? 0 : UInt64(scaled)
            }
            i = j
        }
        if overflow { throw Error.outOfRange(text) }

        var multiplier: UInt64 = 1
        var usedSuffix = false
        if i < bytes.count, let m = suffixMultiplier(bytes[i]) {
            multiplier = m
            usedSuffix = true
            i += 1
        }
        guard i == bytes.count else { throw Error.invalid(text) }

        if multiplier == 1 {
            // A fraction needs a scale.
            if fraction != 0 { throw Error.invalid(text) }
            return Parsed(value: value, usedHexSuffix: hex && usedSuffix)
        }
        // Exact value * multiplier + fraction * multiplier, rounded half up; 128-bit check.
        let whole = value.multipliedFullWidth(by: multiplier)
        var high = whole.high
        var low = whole.low
        let part = fraction.multipliedFullWidth(by: multiplier)
        var (sum, carry) = low.addingReportingOverflow(part.high)
        if carry { high += 1 }
        low = sum
        let roundUp: UInt64 = part.low >> 63
        (sum, carry) = low.addingReportingOverflow(roundUp)
        if carry { high += 1 }
        low = sum
        guard high == 0 else { throw Error.outOfRange(text) }
        return Parsed(value: low, usedHexSuffix: hex && usedSuffix)
    }

    /// strtod only takes "e" as an exponent when digits (after an optional sign) follow it;
    /// otherwise the "e" is left over and QEMU reads it as the exabyte suffix ("1.5e").
    private static func exponentFollows(_ bytes: [UInt8], after e: Int) -> Bool {
        var k = e + 1
        if k < bytes.count, bytes[k] == UInt8(ascii: "+") || bytes[k] == UInt8(ascii: "-") { k += 1 }
        return k < bytes.count && decimalDigit(bytes[k]) != nil
    }

    static func suffixMultiplier(_ c: UInt8) -> UInt64? {
        switch c {
        case UInt8(ascii: "B"), UInt8(ascii: "b"): return 1
        case UInt8(ascii: "K"), UInt8(ascii: "k"): return 1 << 10
        case UInt8(ascii: "M"), UInt8(ascii: "m"): return 1 << 20
        case UInt8(ascii: "G"), UInt8(ascii: "g"): return 1 << 30
        case UInt8(ascii: "T"), UInt8(ascii: "t"): return 1 << 40
        case UInt8(ascii: "P"), UInt8(ascii: "p"): return 1 << 50
        case UInt8(ascii: "E"), UInt8(ascii: "e"): return 1 << 60
        default: return nil
        }
    }

    static func isSpace(_ c: UInt8) -> Bool {
        c == 0x20 || (c >= 0x09 && c <= 0x0d)
    }

    static func decimalDigit(_ c: UInt8) -> UInt8? {
        c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") ? c - UInt8(ascii: "0") : nil
    }

    static func hexDigit(_ c: UInt8) -> UInt8? {
        if let d = decimalDigit(c) { return d }
        if c >= UInt8(ascii: "a") && c <= UInt8(ascii: "f") { return c - UInt8(ascii: "a") + 10 }
        if c >= UInt8(ascii: "A") && c <= UInt8(ascii: "F") { return c - UInt8(ascii: "A") + 10 }
        return nil
    }

    /// qemu_strtou64 with base 0 (QemuOpts "number" options): decimal, 0x hex or 0 octal,
    /// optional white space and sign; like strtoull, "-1" wraps to 2^64-1.
    static func parseNumber(_ text: String) throws -> UInt64 {
        let bytes = Array(text.utf8)
        var i = 0
        while i < bytes.count, isSpace(bytes[i]) { i += 1 }
        var negative = false
        if i < bytes.count, bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-") {
            negative = bytes[i] == UInt8(ascii: "-")
            i += 1
        }
        var base: UInt64 = 10
        if i + 1 < bytes.count, bytes[i] == UInt8(ascii: "0"),
           bytes[i + 1] == UInt8(ascii: "x") || bytes[i + 1] == UInt8(ascii: "X"),
           i + 2 < bytes.count, hexDigit(bytes[i + 2]) != nil {
            base = 16
            i += 2
        } else if i < bytes.count, bytes[i] == UInt8(ascii: "0") {
            base = 8
        }
        let start = i
        var value: UInt64 = 0
        var overflow = false
        while i < bytes.count, let d = hexDigit(bytes[i]), UInt64(d) < base {
            let (m, o1) = value.multipliedReportingOverflow(by: base)
            let (s, o2) = m.addingReportingOverflow(UInt64(d))
            overflow = overflow || o1 || o2
            value = s
            i += 1
        }
        guard i > start, i == bytes.count else { throw Error.invalid(text) }
        if overflow { throw Error.outOfRange(text) }
        return negative ? 0 &- value : value
    }
}
