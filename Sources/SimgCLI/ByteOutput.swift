/// Output built as bytes in one fixed buffer and handed to the console when it fills: for
/// listings of tens of thousands of lines (map), where String interpolation, growing arrays
/// and temporary digit arrays cost more than computing what is listed.
///
/// Each append first makes room (`reserve`), so a write never runs past the buffer; a piece
/// larger than the buffer (a very long file name) goes to the console directly.
final class ByteOutput {
    let console: Console
    private let capacity: Int
    private let base: UnsafeMutablePointer<UInt8>
    private var count = 0

    init(console: Console, capacity: Int = 1 << 16) {
        self.console = console
        self.capacity = max(capacity, 64)
        base = .allocate(capacity: self.capacity)
    }

    deinit { base.deallocate() }

    /// Hands what is buffered to the console.
    func flush() {
        guard count > 0 else { return }
        // Sound: base holds `count` initialized bytes (count <= capacity), copied out here.
        console.outBytes(Array(UnsafeBufferPointer(start: base, count: count)))
        count = 0
    }

    /// Makes room for `n` more bytes (n <= capacity).
    private func reserve(_ n: Int) {
        if capacity - count < n { flush() }
    }

    func append(_ text: StaticString) {
        let n = text.utf8CodeUnitCount
        reserve(n)
        // Sound: a StaticString's utf8Start points at its utf8CodeUnitCount bytes for the
        // program's lifetime; reserve left n bytes free at base + count (all literals here
        // are far shorter than the buffer).
        (base + count).update(from: text.utf8Start, count: n)
        count += n
    }

    func append(_ bytes: [UInt8]) {
        guard bytes.count <= capacity else {
            flush()
            console.outBytes(bytes)
            return
        }
        reserve(bytes.count)
        bytes.withUnsafeBufferPointer { source in
            // Sound: reserve left source.count bytes free at base + count; an empty array is
            // skipped (its base address may be nil).
            if let from = source.baseAddress { (base + count).update(from: from, count: source.count) }
        }
        count += bytes.count
    }

    /// "00" "01" … "99": two digits per division when writing decimals.
    private static let digitPairs: [UInt8] = (0..<100).flatMap { [UInt8(ascii: "0") + UInt8($0 / 10), UInt8(ascii: "0") + UInt8($0 % 10)] }

    /// `value` in decimal, as printf's `%llu`.
    func appendDecimal(_ value: UInt64) {
        var digits = 1
        var bound: UInt64 = 10
        while digits < 20 && value >= bound {
            digits += 1
            if digits < 20 { bound &*= 10 }
        }
        reserve(digits)
        var v = value
        var at = base + count + digits
        Self.digitPairs.withUnsafeBufferPointer { pairs in
            // Sound: `at` moves back from base + count + digits and stops at base + count: each
            // step writes only bytes of the `digits` reserve left free (one per digit), and
            // the pair index 2 * (v % 100) + 1 is below pairs.count (200).
            while v >= 100 {
                let pair = Int(v % 100) * 2
                v /= 100
                at -= 2
                at[0] = pairs[pair]
                at[1] = pairs[pair + 1]
            }
            if v >= 10 {
                at -= 2
                at[0] = pairs[Int(v) * 2]
                at[1] = pairs[Int(v) * 2 + 1]
            } else {
                at -= 1
                at[0] = UInt8(ascii: "0") + UInt8(truncatingIfNeeded: v)
            }
        }
        count += digits
    }

    /// printf's `%#-16x`: 0x-prefixed lower-case hex (plain `0` for zero), left-justified in 16
    /// (longer values are not cut).
    func appendHexColumn(_ value: UInt64) {
        let digits = value == 0 ? 1 : (64 - value.leadingZeroBitCount + 3) / 4
        let width = value == 0 ? 1 : digits + 2
        let padded = max(width, 16)
        reserve(padded)
        // Sound: reserve left `padded` bytes free at base + count, and every write below is
        // at p + i with i < padded.
        let p = base + count
        if value == 0 {
            p[0] = UInt8(ascii: "0")
        } else {
            p[0] = UInt8(ascii: "0")
            p[1] = UInt8(ascii: "x")
            for d in 0..<digits {
                let nibble = UInt8(truncatingIfNeeded: (value >> UInt64(4 * (digits - 1 - d))) & 0xF)
                p[2 + d] = nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "a") + nibble - 10
            }
        }
        for i in width..<padded { p[i] = UInt8(ascii: " ") }
        count += padded
    }
}
