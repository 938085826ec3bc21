import DiskIO
import ImageFormats
import Testing
@testable import Pipeline
import TestSupport

@Suite("convert planner") struct ConvertPlannerTests {
    let k: UInt64 = 1024

    func chain(_ dir: TempDir) throws -> (top: FakeImage, base: FakeImage) {
        try pipelineFile(dir.file("top"), size: 4096, pieces: [])
        try pipelineFile(dir.file("base"), size: 4096, pieces: [])
        let base = FakeImage(path: "base", size: 256 * k, dataFile: try DiskFile.open(dir.file("base"), access: .readOnly),
                             extents: [Extent(offset: 0, length: 128 * k, kind: .data(hostOffset: 0)),
                                       Extent(offset: 128 * k, length: 128 * k, kind: .hole)])
        let top = FakeImage(path: "top", size: 256 * k, dataFile: try DiskFile.open(dir.file("top"), access: .readOnly),
                            extents: [Extent(offset: 0, length: 64 * k, kind: .data(hostOffset: 1 << 20)),
                                      Extent(offset: 64 * k, length: 128 * k, kind: .backing),
                                      Extent(offset: 192 * k, length: 32 * k, kind: .zero),
                                      Extent(offset: 224 * k, length: 32 * k, kind: .compressed(hostOffset: 2 << 20, length: 9000))],
                            backing: base)
        return (top, base)
    }

    @Test("backing ranges are resolved in the backing image; zero and hole are zeros; compressed is read")
    func flattensChain() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (top, _) = try chain(dir)
        let planner = try ConvertPlanner(sources: [top])
        #expect(planner.totalSize == 256 * k)
        let first = try planner.piece(at: 0)
        #expect(first.length == 64 * k)
        guard case .data(let topFile, let host, _, _) = first.kind else { Issue.record("not data: \(first)"); return }
        #expect(host == 1 << 20)
        let second = try planner.piece(at: 64 * k)
        #expect(second.length == 64 * k)
        guard case .data(let baseFile, let baseHost, _, let imageOffset) = second.kind else {
            Issue.record("not data: \(second)"); return
        }
        #expect(baseFile != topFile)
        #expect(baseHost == 64 * k && imageOffset == 64 * k)
        // Past the backing image's data: its hole, clipped to the top's backing extent.
        let third = try planner.piece(at: 128 * k)
        #expect(third == SourcePiece(offset: 128 * k, length: 64 * k, kind: .zero))
        #expect(try planner.piece(at: 192 * k) == SourcePiece(offset: 192 * k, length: 32 * k, kind: .zero))
        let last = try planner.piece(at: 224 * k)
        guard case .read(_, let readOffset) = last.kind else { Issue.record("not read: \(last)"); return }
        #expect(readOffset == 224 * k && last.length == 32 * k)
    }

    @Test("asking inside a known piece does not query the image again")
    func cachesPieces() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (top, _) = try chain(dir)
        let planner = try ConvertPlanner(sources: [top])
        _ = try planner.piece(at: 0)
        let calls = top.blockStatusCalls
        let inside = try planner.piece(at: 4 * k)
        #expect(top.blockStatusCalls == calls)
        guard case .data(_, let host, _, _) = inside.kind else { Issue.record("not data"); return }
        #expect(host == (1 << 20) + 4 * k && inside.length == 60 * k)
    }

    @Test("-B: unallocated top ranges are kept for the target's backing file, resolved on request")
    func keepsBacking() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (top, _) = try chain(dir)
        let planner = try ConvertPlanner(sources: [top], keepBacking: true)
        #expect(try planner.piece(at: 64 * k) == SourcePiece(offset: 64 * k, length: 128 * k, kind: .keep))
        let resolved = try planner.piece(at: 64 * k, resolvingKeep: true)
        #expect(resolved.isKeep)
        guard case .data = resolved.kind else { Issue.record("not data: \(resolved)"); return }
        // A zero cluster of the top layer is not kept: it must shadow the backing file.
        #expect(try planner.piece(at: 192 * k).kind == .zero)
    }

    @Test("several sources are laid end to end")
    func concatenates() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let (top, base) = try chain(dir)
        let planner = try ConvertPlanner(sources: [base, top])
        #expect(planner.totalSize == 512 * k)
        #expect(planner.starts == [0, 256 * k])
        let piece = try planner.piece(at: 256 * k)
        #expect(piece.offset == 256 * k && piece.length == 64 * k)
        guard case .data(_, let host, _, _) = piece.kind else { Issue.record("not data"); return }
        #expect(host == 1 << 20)
        #expect(try planner.piece(at: 128 * k) == SourcePiece(offset: 128 * k, length: 128 * k, kind: .zero))
    }

    @Test("a layer answering with an empty extent is an error, not a hang")
    func badBlockStatus() throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        try pipelineFile(dir.file("bad"), size: 4096, pieces: [])
        let bad = FakeImage(path: "bad", size: 64 * k, dataFile: try DiskFile.open(dir.file("bad"), access: .readOnly),
                            extents: [Extent(offset: 0, length: 64 * k, kind: .hole)])
        bad.reportedLength = 0
        let planner = try ConvertPlanner(sources: [bad])
        #expect(throws: ImageError.self) { try planner.piece(at: 0) }
    }
}
