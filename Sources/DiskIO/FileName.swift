import Glibc

/// Linux file names are bytes, not text: any byte but NUL and '/' may appear in a name, so a
/// name that is not valid UTF-8 is still a name, and simg must open, create and print exactly
/// those bytes.
///
/// simg keeps names (and every other string that may hold one: arguments, messages, names read
/// from image headers) in Swift `String`s, and maps bytes to strings losslessly here: valid
/// UTF-8 is decoded as usual, and each byte that is not part of a valid sequence becomes one
/// "escape" scalar of a private-use range (U+10FF80 + byte - 0x80, so 0xFF is U+10FFFF).
/// Mapping back, each escape scalar is its byte again. To keep the round trip exact, a valid
/// sequence that itself encodes a scalar of that range is escaped byte by byte too (so its
/// bytes come back unchanged). This is Python's surrogateescape, with a private-use range
/// because a Swift `String` cannot hold lone surrogates.
///
/// Where the bytes matter: `withCString` for every system call that takes a name, `bytes(of:)`
/// for output (stdout/stderr print the name's own bytes, as qemu-img does), image headers, and
/// JSON (which decodes the bytes as QEMU does, with U+FFFD where they are not UTF-8).
public enum FileName {
    /// The first scalar of the escape range: byte 0x80 maps to it, 0xFF to U+10FFFF.
    static let escapeBase: UInt32 = 0x10_FF80

    /// The string for `bytes` (a file name, an argument, a name read from an image).
    public static func decode<Bytes: Collection>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
        let array = Array(bytes)
        // Valid UTF-8 without a 0xF4 lead byte cannot hold an escape-range scalar (U+10FF80 and
        // up take F4 8F BE/BF), so the standard library's validating decoder gives the answer:
        // a fast path for the long names of hostile snapshot tables (64 KiB each).
        let mayHoldEscapes = array.withUnsafeBytes { raw in
            // Sound: memchr reads exactly raw.count bytes of the array's own storage.
            raw.count > 0 && memchr(raw.baseAddress!, 0xF4, raw.count) != nil
        }
        if !mayHoldEscapes, let valid = String(validating: array, as: UTF8.self) { return valid }
        var scalars = String.UnicodeScalarView()
        var i = 0
        while i < array.count {
            let (scalar, length) = decodeScalar(array, at: i)
            if let scalar, scalar.value < escapeBase {
                scalars.append(scalar)
            } else {
                // Invalid bytes, or a valid encoding of an escape scalar: one escape per byte.
                for byte in array[i..<i + length] { scalars.append(escape(byte)) }
            }
            i += length
        }
        return String(scalars)
    }

    /// The bytes `name` stands for: UTF-8, with each escape scalar turned back into its byte.
    public static func bytes(of name: String) -> [UInt8] {
        if !hasEscapes(name) { return Array(name.utf8) }
        var result: [UInt8] = []
        result.reserveCapacity(name.utf8.count)
        for scalar in name.unicodeScalars {
            if scalar.value >= escapeBase {
                result.append(UInt8(scalar.value - escapeBase + 0x80))
            } else {
                result.append(contentsOf: String(scalar).utf8)
            }
        }
        return result
    }

    /// The length of `name` in bytes (what qcow2's 1023-byte limit on names counts).
    public static func byteCount(_ name: String) -> Int {
        var count = 0
        for scalar in name.unicodeScalars {
            count += scalar.value >= escapeBase ? 1 : UTF8.width(scalar)
        }
        return count
    }

    /// Calls `body` with `name` as a NUL-terminated C string of its own bytes (for open(2),
    /// stat(2), unlink(2), ...). A name holding NUL cannot reach the kernel whole; the C string
    /// then ends there, as it would for any C program given it.
    public static func withCString<Result>(_ name: String,
                                           _ body: (UnsafePointer<CChar>) throws -> Result) rethrows -> Result {
        if !hasEscapes(name) { return try name.withCString(body) }
        var raw = bytes(of: name).map { CChar(bitPattern: $0) }
        raw.append(0)
        // Sound: `raw` is NUL-terminated and lives until withUnsafeBufferPointer returns.
        return try raw.withUnsafeBufferPointer { try body($0.baseAddress!) }
    }

    /// Whether `name` holds bytes that are not valid UTF-8.
    public static func hasEscapes(_ name: String) -> Bool {
        name.unicodeScalars.contains(where: { $0.value >= escapeBase })
    }

    private static func escape(_ byte: UInt8) -> Unicode.Scalar {
        // Sound: escapeBase + 0x7F is U+10FFFF, the largest scalar; none of the range is a surrogate.
        Unicode.Scalar(escapeBase + UInt32(byte) - 0x80)!
    }

    /// One UTF-8 sequence at `i`: the scalar and its length, or nil and 1 for a byte that does
    /// not start a valid, shortest-form sequence (RFC 3629: no surrogates, nothing past U+10FFFF).
    private static func decodeScalar(_ b: [UInt8], at i: Int) -> (Unicode.Scalar?, Int) {
        let lead = b[i]
        if lead < 0x80 { return (Unicode.Scalar(lead), 1) }
        let length: Int, minimum: UInt32
        var value: UInt32
        switch lead {
        case 0xC2...0xDF: (length, minimum, value) = (2, 0x80, UInt32(lead & 0x1F))
        case 0xE0...0xEF: (length, minimum, value) = (3, 0x800, UInt32(lead & 0x0F))
        case 0xF0...0xF4: (length, minimum, value) = (4, 0x1_0000, UInt32(lead & 0x07))
        default: return (nil, 1)
        }
        guard i + length <= b.count else { return (nil, 1) }
        for k in 1..<length {
            let c = b[i + k]
            guard c & 0xC0 == 0x80 else { return (nil, 1) }
            value = value << 6 | UInt32(c & 0x3F)
        }
        guard value >= minimum, let scalar = Unicode.Scalar(value) else { return (nil, 1) }
        return (scalar, length)
    }
}
