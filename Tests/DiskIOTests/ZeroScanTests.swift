import DiskIO
import Testing

/// The one zero check (convert -S, the compressed target's zero clusters, rebase's zero runs).
@Suite("zero scan") struct ZeroScanTests {
    @Test("finds a single non-zero byte anywhere", arguments: [1, 15, 16, 17, 31, 32, 33, 4095, 4096, 4099, 65536])
    func detects(count: Int) {
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeBytes {
            #expect(ZeroScan.isZero($0.baseAddress!, count: count))
            #expect(ZeroScan.isZero($0))
        }
        for position in Set([0, count / 2, count - 1, min(8, count - 1), min(16, count - 1)]) {
            bytes[position] = 0x80
            bytes.withUnsafeBytes {
                #expect(!ZeroScan.isZero($0.baseAddress!, count: count), "byte \(position) of \(count)")
                #expect(!ZeroScan.isZero($0), "byte \(position) of \(count)")
            }
            bytes[position] = 0
        }
    }

    @Test func anEmptyBufferIsZero() {
        #expect(ZeroScan.isZero(UnsafeRawBufferPointer(start: nil, count: 0)))
    }
}
