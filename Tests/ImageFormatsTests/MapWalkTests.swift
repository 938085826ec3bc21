import DiskIO
import ImageFormats
import Testing
import TestSupport

private let k: UInt64 = 4096

/// ChainWalker.mapEntry/mapWalk over images that only report `Extent`s (FakeImage, no
/// `LayerStatusImage`): the status derived from block status, qemu-img map's depths and merging.
@Suite("ChainWalker map walk")
struct MapWalkTests {
    struct Line: Equatable, CustomStringConvertible {
        var start, length: UInt64
        var depth: Int
        var present, zero, data: Bool
        var offset: UInt64?
        var description: String { "\(start)+\(length) d\(depth) p\(present) z\(zero) d\(data) o\(offset.map(String.init) ?? "-")" }
        init(_ start: UInt64, _ length: UInt64, _ depth: Int, present: Bool, zero: Bool, data: Bool, offset: UInt64? = nil) {
            self.start = start; self.length = length; self.depth = depth
            self.present = present; self.zero = zero; self.data = data; self.offset = offset
        }
        init(_ e: MapEntry) {
            self.init(e.start, e.length, e.depth, present: e.present, zero: e.zero, data: e.data, offset: e.hostOffset)
        }
    }

    func lines(_ top: any DiskImage, from: UInt64 = 0, length: UInt64? = nil) throws -> [Line] {
        var result: [Line] = []
        try ChainWalker(top: top).mapWalk(from: from, length: length ?? top.virtualSize - from) { result.append(Line($0)) }
        return result
    }

    @Test("depths through the chain, zeros past a shorter backing file, merging of contiguous data only")
    func chain() throws {
        let fixture = try ChainFixture()
        let base = FakeImage("base", size: 4 * k, file: fixture.file,
                             [(0, .data(hostOffset: 100 * k)), (1 * k, .data(hostOffset: 101 * k)), (2 * k, .hole)])
        let top = FakeImage("top", size: 8 * k, file: fixture.file,
                            [(0, .backing), (2 * k, .data(hostOffset: 300 * k)), (3 * k, .compressed(hostOffset: 9 * k, length: 100)),
                             (4 * k, .compressed(hostOffset: 20 * k, length: 100)), (5 * k, .zero), (6 * k, .backing)],
                            backing: base)
        #expect(try lines(top) == [
            Line(0, 2 * k, 1, present: true, zero: false, data: true, offset: 100 * k),
            Line(2 * k, 1 * k, 0, present: true, zero: false, data: true, offset: 300 * k),
            // Compressed clusters have no offset: they merge however they lie on the host.
            Line(3 * k, 2 * k, 0, present: true, zero: false, data: true),
            Line(5 * k, 1 * k, 0, present: true, zero: true, data: false),
            // Past the backing file's end: zeros at the top's depth, not present.
            Line(6 * k, 2 * k, 0, present: false, zero: true, data: false),
        ])
        // A window starting inside a data range shifts its offset.
        #expect(try lines(top, from: 100, length: 2 * k) == [
            Line(100, 2 * k - 100, 1, present: true, zero: false, data: true, offset: 100 * k + 100),
            Line(2 * k, 100, 0, present: true, zero: false, data: true, offset: 300 * k),
        ])
        // Unallocated down to the bottom: the bottom layer's depth.
        let onlyHoles = FakeImage("t", size: 4 * k, file: fixture.file, [(0, .backing)], backing:
            FakeImage("b", size: 4 * k, file: fixture.file, [(0, .hole)]))
        #expect(try lines(onlyHoles) == [Line(0, 4 * k, 1, present: false, zero: true, data: false)])
    }
}
