import DiskIO
import ImageFormats
import Testing
import TestSupport

// The made-up layers are TestSupport's FakeImage (its extents laid end to end, the
// questions it was asked in `asked`).

/// A chain's fakes share one scratch file as their data file (nothing is read).
final class ChainFixture {
    let scratch: TempDir
    let file: DiskFile

    init() throws {
        scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        file = try DiskFile.create(scratch.file("data"))
    }

    deinit { file.close() }
}

/// What a walked range was, in a form `#expect` compares: layer by path ("-" for none).
private struct Seen: Equatable, CustomStringConvertible {
    var offset: UInt64, length: UInt64, kind: Extent.Kind, depth: Int, layer: String
    init(_ offset: UInt64, _ length: UInt64, _ kind: Extent.Kind, depth: Int, _ layer: String) {
        self.offset = offset; self.length = length; self.kind = kind; self.depth = depth; self.layer = layer
    }
    init(_ extent: ChainExtent) {
        self.init(extent.offset, extent.length, extent.kind, depth: extent.depth, extent.layer?.path ?? "-")
    }
    var description: String { "\(offset)+\(length) \(kind) d\(depth) \(layer)" }
}

private let k: UInt64 = 4096

@Suite("ChainWalker")
struct ChainWalkerTests {
    @Test("walk joins compressed clusters only while they are packed one after another")
    func compressedRuns() throws {
        let fixture = try ChainFixture()
        let image = FakeImage("c", size: 4 * k, file: fixture.file, [
            (0, .compressed(hostOffset: 100 * k, length: 3000)),
            (1 * k, .compressed(hostOffset: 100 * k + 2500, length: 2000)),  // starts inside the first
            (2 * k, .compressed(hostOffset: 900 * k, length: 1000)),  // elsewhere
            (3 * k, .hole),
        ])
        let seen = try ChainWalker(top: image).extents(from: 0, length: 4 * k).map(Seen.init)
        #expect(seen == [
            Seen(0, 2 * k, .compressed(hostOffset: 100 * k, length: 4500), depth: 0, "c"),
            Seen(2 * k, 1 * k, .compressed(hostOffset: 900 * k, length: 1000), depth: 0, "c"),
            Seen(3 * k, 1 * k, .hole, depth: 0, "-"),
        ])
    }

    @Test("each range is answered by the layer that holds it, with its depth")
    func depthAndLayer() throws {
        let fixture = try ChainFixture()
        let base = FakeImage("base", size: 8 * k, file: fixture.file,
                                  [(0, .data(hostOffset: 100 * k)), (2 * k, .hole), (6 * k, .compressed(hostOffset: 200 * k, length: 3000))])
        let mid = FakeImage("mid", size: 8 * k, file: fixture.file,
                                 [(0, .backing), (1 * k, .zero), (3 * k, .backing)], backing: base)
        let top = FakeImage("top", size: 8 * k, file: fixture.file,
                                 [(0, .backing), (4 * k, .data(hostOffset: nil)), (5 * k, .backing)], backing: mid)
        let walker = ChainWalker(top: top)
        let seen = try walker.extents(from: 0, length: 8 * k).map(Seen.init)
        #expect(seen == [
            Seen(0, 1 * k, .data(hostOffset: 100 * k), depth: 2, "base"),
            Seen(1 * k, 2 * k, .zero, depth: 1, "mid"),
            Seen(3 * k, 1 * k, .hole, depth: 2, "-"),
            Seen(4 * k, 1 * k, .data(hostOffset: nil), depth: 0, "top"),
            Seen(5 * k, 1 * k, .hole, depth: 2, "-"),
            Seen(6 * k, 2 * k, .compressed(hostOffset: 200 * k, length: 3000), depth: 2, "base"),
        ])
        // The layer is the image itself, not just one with the same name.
        let first = try walker.extent(at: 0, length: 8 * k)
        #expect(first.layer === base)
        #expect(try walker.extent(at: 4 * k, length: 4 * k).layer === top)
    }

    @Test("past the end of a shorter backing file reads as zeros at the depth of the layer above")
    func shorterBacking() throws {
        let fixture = try ChainFixture()
        let base = FakeImage("base", size: 3 * k, file: fixture.file, [(0, .data(hostOffset: 0)), (2 * k, .hole)])
        let top = FakeImage("top", size: 8 * k, file: fixture.file, [(0, .backing)], backing: base)
        let walker = ChainWalker(top: top)
        let seen = try walker.extents(from: 0, length: 8 * k).map(Seen.init)
        #expect(seen == [
            Seen(0, 2 * k, .data(hostOffset: 0), depth: 1, "base"),
            Seen(2 * k, 1 * k, .hole, depth: 1, "-"),
            Seen(3 * k, 5 * k, .hole, depth: 0, "-"),
        ])
        // The backing file is never asked past its end.
        #expect(base.asked.allSatisfy { $0.offset + $0.length <= 3 * k })
        #expect(base.asked.count == 2)
    }

    @Test("adjacent answers merge only with the same layer, depth, kind and host contiguity")
    func merging() throws {
        let fixture = try ChainFixture()
        let base = FakeImage("base", size: 8 * k, file: fixture.file, [(0, .hole), (6 * k, .zero)])
        let top = FakeImage("top", size: 8 * k, file: fixture.file, [
            (0, .data(hostOffset: 10 * k)), (1 * k, .data(hostOffset: 11 * k)), // contiguous: one
            (2 * k, .data(hostOffset: 50 * k)),                                  // host jump: new
            (3 * k, .backing), (4 * k, .backing),                               // base hole twice: one
            (5 * k, .hole),                                                      // hole at depth 0: new
            (6 * k, .backing), (7 * k, .zero),                                  // zero in base, then in top
        ], backing: base)
        let walker = ChainWalker(top: top)
        let seen = try walker.extents(from: 0, length: 8 * k).map(Seen.init)
        #expect(seen == [
            Seen(0, 2 * k, .data(hostOffset: 10 * k), depth: 0, "top"),
            Seen(2 * k, 1 * k, .data(hostOffset: 50 * k), depth: 0, "top"),
            Seen(3 * k, 2 * k, .hole, depth: 1, "-"),
            Seen(5 * k, 1 * k, .hole, depth: 0, "-"),
            Seen(6 * k, 1 * k, .zero, depth: 1, "base"),
            Seen(7 * k, 1 * k, .zero, depth: 0, "top"),
        ])
        // One block-status call per layer per answer: 8 from the top, 3 from the base.
        #expect(walker.queries == 11)
        // A single step does not merge: it stops where the top's answer does.
        #expect(Seen(try walker.extent(at: 0, length: 8 * k)) == Seen(0, 1 * k, .data(hostOffset: 10 * k), depth: 0, "top"))
    }

    @Test("a range from part-way through is clipped to the range asked")
    func partialRange() throws {
        let fixture = try ChainFixture()
        let base = FakeImage("base", size: 8 * k, file: fixture.file, [(0, .data(hostOffset: 0))])
        let top = FakeImage("top", size: 8 * k, file: fixture.file, [(0, .backing)], backing: base)
        let seen = try ChainWalker(top: top).extents(from: 3 * k, length: 2 * k).map(Seen.init)
        #expect(seen == [Seen(3 * k, 2 * k, .data(hostOffset: 3 * k), depth: 1, "base")])
        #expect(base.asked.map(\.length) == [2 * k])
    }

    @Test("maxDepth stops the walk: ranges below come back as .backing without a layer")
    func maxDepth() throws {
        let fixture = try ChainFixture()
        let base = FakeImage("base", size: 4 * k, file: fixture.file, [(0, .data(hostOffset: 0))])
        let top = FakeImage("top", size: 4 * k, file: fixture.file,
                                 [(0, .backing), (2 * k, .zero)], backing: base)
        let walker = ChainWalker(top: top)
        let seen = try walker.extents(from: 0, length: 4 * k, maxDepth: 0).map(Seen.init)
        #expect(seen == [Seen(0, 2 * k, .backing, depth: 0, "-"), Seen(2 * k, 2 * k, .zero, depth: 0, "top")])
        #expect(base.asked.isEmpty)
    }

    @Test("a layer answering with an empty or too long extent is an error naming it")
    func badAnswers() throws {
        let fixture = try ChainFixture()
        for bad: UInt64 in [0, 5 * k] {
            let base = FakeImage("base.qcow2", size: 4 * k, file: fixture.file, [(0, .data(hostOffset: 0))])
            base.reportedLength = bad
            let top = FakeImage("top", size: 4 * k, file: fixture.file, [(0, .backing)], backing: base)
            let error = #expect(throws: ImageError.self) { try ChainWalker(top: top).extents(from: 0, length: 4 * k) }
            #expect(error?.path == "base.qcow2")
        }
    }
}
