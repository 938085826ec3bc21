import DiskIO
import ImageFormats
import Testing
import TestSupport
@testable import Pipeline

/// The planner's pieces and block-status calls over a three-layer chain with a shorter middle
/// layer, pinned so moving the chain walk into `ChainWalker` changes neither (the expected
/// transcripts were taken from the planner before the move).
@Suite("convert planner chain") struct ConvertPlannerChainTests {
    let k: UInt64 = 1024

    /// top (64k) → mid (40k) → base (64k).
    func chain(_ dir: TempDir) throws -> [FakeImage] {
        try pipelineFile(dir.file("data"), size: 4096, pieces: [])
        let file = try DiskFile.open(dir.file("data"), access: .readOnly)
        // Kinds laid end to end (offsets in KiB), each up to the next one's start.
        func extents(_ list: [(UInt64, Extent.Kind)], size: UInt64) -> [Extent] {
            FakeImage.laidEndToEnd(list, size: size, unit: k)
        }
        let base = FakeImage(path: "base", size: 64 * k, dataFile: file, extents: extents(
            [(0, .data(hostOffset: 0)), (8, .hole), (16, .compressed(hostOffset: 200 * k, length: 5000)), (24, .data(hostOffset: 100 * k)), (48, .zero)], size: 64 * k))
        let mid = FakeImage(path: "mid", size: 40 * k, dataFile: file, extents: extents(
            [(0, .backing), (4, .zero), (12, .backing), (28, .data(hostOffset: nil)), (32, .backing)], size: 40 * k), backing: base)
        let top = FakeImage(path: "top", size: 64 * k, dataFile: file, extents: extents(
            [(0, .backing), (2, .data(hostOffset: 500 * k)), (6, .backing), (36, .zero), (38, .backing)], size: 64 * k), backing: mid)
        return [top, mid, base]
    }

    func transcript(keepBacking: Bool, resolvingKeep: Bool) throws -> String {
        let dir = try TempDir(prefix: "simg-pipeline")
        let images = try chain(dir)
        let planner = try ConvertPlanner(sources: [images[0]], keepBacking: keepBacking)
        var lines: [String] = []
        var offset: UInt64 = 0
        while offset < planner.totalSize {
            let piece = try planner.piece(at: offset, resolvingKeep: resolvingKeep)
            lines.append("\(piece.offset / k)+\(piece.length / k) \(piece.kind)\(piece.isKeep ? " keep" : "")")
            offset = piece.end
        }
        lines.append("queries \(planner.queries) calls \(images.map(\.blockStatusCalls)) images \(planner.images.map(\.path))")
        return lines.joined(separator: "\n")
    }

    // Past the middle layer's end (40k on) reads as zeros, never flagged keep; a zero in a
    // backing layer is flagged keep when resolved, one in the top layer is not.
    @Test("flattening: same pieces and calls as before the walker")
    func flattening() throws {
        #expect(try transcript(keepBacking: false, resolvingKeep: false) == """
            0+2 data(file: 0, host: 0, image: 0, imageOffset: 0)
            2+4 data(file: 0, host: 512000, image: 1, imageOffset: 2048)
            6+6 zero
            12+4 zero
            16+8 read(image: 0, imageOffset: 16384)
            24+4 data(file: 0, host: 102400, image: 0, imageOffset: 24576)
            28+4 read(image: 2, imageOffset: 28672)
            32+4 data(file: 0, host: 110592, image: 0, imageOffset: 32768)
            36+2 zero
            38+2 data(file: 0, host: 116736, image: 0, imageOffset: 38912)
            40+24 zero
            queries 25 calls [11, 8, 6] images ["base", "top", "mid"]
            """)
    }

    @Test("-B: same pieces and calls as before the walker")
    func keep() throws {
        #expect(try transcript(keepBacking: true, resolvingKeep: false) == """
            0+2 keep
            2+4 data(file: 0, host: 512000, image: 0, imageOffset: 2048)
            6+30 keep
            36+2 zero
            38+26 keep
            queries 5 calls [5, 0, 0] images ["top"]
            """)
    }

    @Test("-B resolved: same pieces and calls as before the walker")
    func keepResolved() throws {
        #expect(try transcript(keepBacking: true, resolvingKeep: true) == """
            0+2 data(file: 0, host: 0, image: 0, imageOffset: 0) keep
            2+4 data(file: 0, host: 512000, image: 1, imageOffset: 2048)
            6+6 zero keep
            12+4 zero keep
            16+8 read(image: 0, imageOffset: 16384) keep
            24+4 data(file: 0, host: 102400, image: 0, imageOffset: 24576) keep
            28+4 read(image: 2, imageOffset: 28672) keep
            32+4 data(file: 0, host: 110592, image: 0, imageOffset: 32768) keep
            36+2 zero
            38+2 data(file: 0, host: 116736, image: 0, imageOffset: 38912) keep
            40+24 zero
            queries 25 calls [11, 8, 6] images ["base", "top", "mid"]
            """)
    }
}
