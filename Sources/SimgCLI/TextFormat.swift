import Glibc

/// Number, size, date and column formatting that must match qemu-img's C printf output.
public enum TextFormat {
    /// qemu's size_to_str: the largest binary unit that keeps the number below 1000 (so
    /// 1000 bytes is "0.977 KiB", not "1000 B"), printed with 3 significant digits ("%0.3g"):
    /// "0 B", "512 B", "64 KiB", "1.5 GiB", "196 KiB", "1.27 MiB".
    public static func size(_ bytes: UInt64) -> String {
        let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
        // The binary exponent of bytes * 1024 / 1000 picks the unit (frexp's exponent e has
        // 2^(e-1) <= x < 2^e); each unit spans 10 exponents.
        var exponent: Int32 = 0
        _ = frexp(Double(bytes) / (1000.0 / 1024.0), &exponent)
        let unit = min(max(Int((exponent - 1) / 10), 0), suffixes.count - 1)
        let divisor = Double(UInt64(1) << UInt64(unit * 10))
        return cFormat("%0.3g", Double(bytes) / divisor) + " " + suffixes[unit] + "B"
    }

    /// One double through C's printf (Swift has no %g of its own).
    static func cFormat(_ format: String, _ value: Double) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        _ = withVaList([value]) { args in
            // The buffer is 64 bytes and vsnprintf never writes past the size it is given.
            buffer.withUnsafeMutableBufferPointer { vsnprintf($0.baseAddress, $0.count, format, args) }
        }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A time in the local time zone as "2026-11-21 05:11:18" (strftime "%Y-%m-%d %H:%M:%S").
    public static func localDate(seconds: UInt64) -> String {
        var time = time_t(clamping: seconds)
        var parts = tm()
        guard localtime_r(&time, &parts) != nil else { return "" }
        var buffer = [CChar](repeating: 0, count: 64)
        let count = buffer.withUnsafeMutableBufferPointer {
            // strftime writes at most $0.count bytes including the terminator.
            strftime($0.baseAddress, $0.count, "%Y-%m-%d %H:%M:%S", &parts)
        }
        return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A snapshot's VM clock as qemu-img 7.2 prints it: "HH:MM:SS.mmm", hours at least 2 digits.
    public static func vmClock(nanoseconds: UInt64) -> String {
        let seconds = nanoseconds / 1_000_000_000
        let millis = (nanoseconds / 1_000_000) % 1000
        return pad(seconds / 3600, 2) + ":" + pad((seconds / 60) % 60, 2) + ":"
            + pad(seconds % 60, 2) + "." + pad(millis, 3)
    }

    private static func pad(_ n: UInt64, _ width: Int) -> String {
        let digits = String(n)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }

    /// printf's "%-Ns": pads with spaces to N bytes (C counts bytes, not characters).
    public static func left(_ text: String, _ width: Int) -> String {
        text + String(repeating: " ", count: max(0, width - text.utf8.count))
    }

    /// printf's "%Ns".
    public static func right(_ text: String, _ width: Int) -> String {
        String(repeating: " ", count: max(0, width - text.utf8.count)) + text
    }
}
