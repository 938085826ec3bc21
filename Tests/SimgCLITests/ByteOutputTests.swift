import Testing
@testable import SimgCLI

/// ByteOutput's number writers against Swift's own formatting (printf's `%llu` and `%#-16x`),
/// at every digit-count boundary, and its flushing when the buffer fills.
@Suite struct ByteOutputTests {
    static let values: [UInt64] = {
        var list: [UInt64] = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 65536, 0xf, 0x10, 0xfff_ffff_ffff_ffff,
                              1 << 63, UInt64.max, UInt64.max - 1]
        var p: UInt64 = 10
        for _ in 0..<18 { list += [p - 1, p, p + 1]; p *= 10 }
        list += [p - 1, p]  // 10^19
        return list
    }()

    func captured(capacity: Int = 1 << 16, _ body: (ByteOutput) -> Void) -> String {
        var text = ""
        let output = ByteOutput(console: Console(out: { text += $0 }, err: { _ in }), capacity: capacity)
        body(output)
        output.flush()
        return text
    }

    @Test func decimalsAndHexColumns() {
        for value in Self.values {
            #expect(captured { $0.appendDecimal(value) } == String(value))
            let hex = value == 0 ? "0" : "0x" + String(value, radix: 16)
            let column = hex.count >= 16 ? hex : hex + String(repeating: " ", count: 16 - hex.count)
            #expect(captured { $0.appendHexColumn(value) } == column)
        }
    }

    @Test func smallBufferFlushesBetweenPieces() {
        let expected = Self.values.map { "\($0)," }.joined() + "end"
        let got = captured(capacity: 64) { output in
            for value in Self.values { output.appendDecimal(value); output.append(",") }
            output.append(Array("end".utf8))
        }
        #expect(got == expected)
        let long = [UInt8](repeating: UInt8(ascii: "n"), count: 200)
        #expect(captured(capacity: 64) { $0.append("a"); $0.append(long); $0.append("b") }
                == "a" + String(repeating: "n", count: 200) + "b")
    }
}
