import DiskIO

/// What QEMU's JSON writer (qobject/json-writer.c) and its QDict do that simg reproduces byte
/// for byte: how strings are quoted, and the order a QDict walks its keys in (qemu-img's JSON
/// output, and the `json:` names QEMU regenerates for images, list members in that order).
public enum QEMUJSON {
    /// QEMU escapes quote, backslash and \b \f \n \r \t by name, and every other code point
    /// below 0x20 or from 0x7F up as \uXXXX in upper-case hex (UTF-16 surrogate pairs above
    /// U+FFFF). It reads the string's bytes with its own UTF-8 decoder (mod_utf8_codepoint), so a
    /// file name that is not UTF-8 (FileName keeps its bytes) gets QEMU's U+FFFD in the same
    /// places, and so do noncharacters.
    public static func quote(_ s: String) -> String {
        var out = "\""
        let bytes = FileName.bytes(of: s)
        var i = 0
        while i < bytes.count {
            let (decoded, next) = qemuCodepoint(bytes, at: i)
            i = next
            let scalar = decoded.flatMap(Unicode.Scalar.init) ?? "\u{FFFD}"
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 || scalar.value >= 0x7F {
                    for unit in String(scalar).utf16 { out += "\\u" + hex4(unit) }
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    /// QEMU's mod_utf8_codepoint: the code point at `i` (nil where QEMU substitutes U+FFFD:
    /// bad or missing continuation bytes, 0xFE/0xFF, overlong forms, surrogates, past U+10FFFF,
    /// noncharacters) and where the next one starts. A sequence cut short by a byte that is no
    /// continuation ends before that byte; an invalid lead byte is skipped alone.
    static func qemuCodepoint(_ b: [UInt8], at i: Int) -> (UInt32?, Int) {
        let lead = b[i]
        if lead < 0x80 { return (UInt32(lead), i + 1) }
        if lead >= 0xFE || lead & 0x40 == 0 { return (nil, i + 1) }
        var length = 0
        var mask: UInt8 = 0x80
        while lead & mask != 0 {
            length += 1
            mask >>= 1
        }
        var cp = UInt32(lead & (mask &- 1))
        var p = i + 1
        for _ in 1..<length {
            guard p < b.count, b[p] & 0xC0 == 0x80 else { return (nil, p) }
            cp = cp << 6 | UInt32(b[p] & 0x3F)
            p += 1
        }
        let minimum: [UInt32] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000]
        if cp > 0x10_FFFF || (0xFDD0...0xFDEF).contains(cp) || cp & 0xFFFE == 0xFFFE
            || (0xD800...0xDFFF).contains(cp) || (cp < minimum[length - 2] && !(cp == 0 && length == 2)) {
            return (nil, p)
        }
        return (cp, p)
    }

    /// QEMU's QDict bucket for a key: the tdb hash of the key bytes, modulo 512.
    public static func bucket(of key: String) -> UInt32 {
        let bytes = FileName.bytes(of: key)
        // All arithmetic wraps at 32 bits, as the C code's unsigned int does.
        var value = UInt32(truncatingIfNeeded: bytes.count) &* 0x238F_13AF
        for (i, byte) in bytes.enumerated() {
            value = value &+ (UInt32(byte) << UInt32((i * 5) % 24))
        }
        let hash = 1_103_515_243 &* value &+ 12345
        return hash % 512
    }

    private static func hex4(_ unit: UInt16) -> String {
        let digits = String(unit, radix: 16, uppercase: true)
        return String(repeating: "0", count: 4 - digits.count) + digits
    }

    /// Compact JSON as QEMU writes it into a regenerated `json:` name: `{"a": 1, "b": "x"}`,
    /// members in QDict order. Values are already JSON text (`quote` strings first).
    public static func compactObject(_ members: [(key: String, json: String)]) -> String {
        let ordered = members.enumerated().sorted { a, b in
            let (ba, bb) = (bucket(of: a.element.key), bucket(of: b.element.key))
            // Within a bucket, the most recently added key comes first (inserts at the head).
            return ba != bb ? ba < bb : a.offset > b.offset
        }
        return "{" + ordered.map { quote($0.element.key) + ": " + $0.element.json }.joined(separator: ", ") + "}"
    }
}
