import DiskIO
/// Big-endian field access on byte arrays: every qcow2 number is stored big-endian.
///
/// Reads are bounds-checked by the caller (parsers validate lengths first); these helpers
/// trap on an out-of-range index like any array access, so callers must never pass offsets
/// taken from a file without checking them against `bytes.count`.
enum QCOW2BE {
    static func u8(_ b: [UInt8], _ at: Int) -> UInt8 { b[at] }

    static func u16(_ b: [UInt8], _ at: Int) -> UInt16 {
        UInt16(b[at]) << 8 | UInt16(b[at + 1])
    }

    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(b[at + i]) }
        return v
    }

    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(b[at + i]) }
        return v
    }

    static func put16(_ b: inout [UInt8], _ at: Int, _ v: UInt16) {
        b[at] = UInt8(truncatingIfNeeded: v >> 8)
        b[at + 1] = UInt8(truncatingIfNeeded: v)
    }

    static func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
        for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) }
    }

    static func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
        for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) }
    }

    static func append16(_ b: inout [UInt8], _ v: UInt16) {
        b.append(UInt8(truncatingIfNeeded: v >> 8)); b.append(UInt8(truncatingIfNeeded: v))
    }

    static func append32(_ b: inout [UInt8], _ v: UInt32) {
        for i in 0..<4 { b.append(UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i)))) }
    }

    static func append64(_ b: inout [UInt8], _ v: UInt64) {
        for i in 0..<8 { b.append(UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i)))) }
    }

    /// Decodes a run of big-endian 64-bit words (a table cluster) into native integers.
    static func words(_ b: [UInt8]) -> [UInt64] {
        let n = b.count / 8
        return [UInt64](unsafeUninitializedCapacity: n) { out, count in
            b.withUnsafeBytes { raw in
                for i in 0..<n {
                    // Sound: i * 8 + 8 <= n * 8 <= raw.count; loadUnaligned has no alignment need.
                    out[i] = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
                }
            }
            count = n
        }
    }

    /// Encodes native 64-bit words as big-endian bytes (the inverse of `words`).
    static func bytes(_ w: [UInt64]) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: w.count * 8) { out, count in
            let raw = UnsafeMutableRawBufferPointer(out)
            for i in 0..<w.count {
                // Sound: the buffer holds w.count * 8 bytes and i * 8 + 8 <= that.
                raw.storeBytes(of: w[i].bigEndian, toByteOffset: i * 8, as: UInt64.self)
            }
            count = w.count * 8
        }
    }

    /// A string from bytes that are not NUL-terminated (qcow2 names). Names are bytes: a name
    /// that is not UTF-8 keeps its bytes (FileName), so it opens and prints as stored.
    static func string(_ b: ArraySlice<UInt8>) -> String {
        FileName.decode(b)
    }

    static func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
}
