import Testing
@testable import SimgCLI

@Suite struct TextFormatTests {
    /// Expected strings are what qemu-img 7.2 prints for these sizes.
    @Test(arguments: [
        (UInt64(0), "0 B"), (512, "512 B"), (999, "999 B"), (1000, "0.977 KiB"), (1023, "0.999 KiB"),
        (1024, "1 KiB"), (1536, "1.5 KiB"), (10240, "10 KiB"), (65536, "64 KiB"), (100352, "98 KiB"),
        (200704, "196 KiB"), (1022976, "999 KiB"), (1047552, "0.999 MiB"), (1048576, "1 MiB"),
        (1331200, "1.27 MiB"), (104857600, "100 MiB"), (1073741824, "1 GiB"), (1610612736, "1.5 GiB"),
        (1099511627776, "1 TiB"), (1125899906842624, "1 PiB"), (4611686018427387904, "4 EiB"),
        (UInt64.max, "16 EiB"),
    ])
    func sizeToString(bytes: UInt64, expected: String) {
        #expect(TextFormat.size(bytes) == expected)
    }

    @Test func vmClock() {
        #expect(TextFormat.vmClock(nanoseconds: 0) == "00:00:00.000")
        #expect(TextFormat.vmClock(nanoseconds: 3_723_456_000_000) == "01:02:03.456")
        #expect(TextFormat.vmClock(nanoseconds: 360_000 * 1_000_000_000) == "100:00:00.000")
    }

    @Test func paddingCountsBytesLikePrintf() {
        #expect(TextFormat.left("ab", 4) == "ab  ")
        #expect(TextFormat.right("ab", 4) == "  ab")
        #expect(TextFormat.left("abcdef", 4) == "abcdef")
        #expect(TextFormat.left("é", 4) == "é  ")
    }

    @Test func localDateFormat() {
        let text = TextFormat.localDate(seconds: 1_795_238_306)
        // The hour depends on the time zone; the shape does not.
        #expect(text.count == 19)
        #expect(text.hasPrefix("2026-11-2"))
    }
}
