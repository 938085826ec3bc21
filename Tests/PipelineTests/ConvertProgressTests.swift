import DiskIO
import Glibc
import ImageFormats
import Testing
@testable import Pipeline
import TestSupport

/// The values convert's `-p` is fed (qemu-img's accounting), whatever simg's chunk size.
@Suite("convert progress") struct ConvertProgressTests {
    /// Reports and questions from one run, collected from the pipeline's thread.
    final class Recorder: @unchecked Sendable {
        var reports: [(done: UInt64, total: UInt64)] = []
        var questions = 0
        /// Progress is first asked for at this question (nil: never).
        let askAt: Int?
        init(askAt: Int?) { self.askAt = askAt }
    }

    /// 5 MiB of data at 1 MiB and 100 KiB at 7 MiB of an 8 MiB raw file; copied in 64 KiB chunks.
    func run(_ recorder: Recorder, onRequest: Bool) throws {
        let dir = try TempDir(prefix: "simg-pipeline")
        let path = dir.file("p.raw")
        try pipelineFile(path, size: 8 << 20, pieces: [(1 << 20, pipelinePattern(5 << 20, seed: 1)),
                                                       (7 << 20, pipelinePattern(100 << 10, seed: 2))])
        let source = try RawImage.open(path: path, writable: false, cache: .writeback)
        defer { try? source.close() }
        var options = ConvertOptions()
        options.bufferSize = 64 << 10
        options.progress = { recorder.reports.append(($0, $1)) }
        if onRequest {
            options.progressRequested = {
                recorder.questions += 1
                return recorder.askAt.map { recorder.questions >= $0 } ?? false
            }
        }
        try ConvertPipeline(sources: [source], target: MemoryTarget(size: 8 << 20), options: options).run()
    }

    @Test("qemu's requests: 2 MiB pieces of each data run, counted over the data only")
    func eager() throws {
        let recorder = Recorder(askAt: nil)
        try run(recorder, onRequest: false)
        let total: UInt64 = (5 << 20) + (100 << 10)
        #expect(recorder.reports.map(\.done) == [2 << 20, 4 << 20, 5 << 20, total])
        #expect(recorder.reports.allSatisfy { $0.total == total })
    }

    @Test("on request: nothing until asked, then where the copy is, then qemu's steps on")
    func onRequest() throws {
        let never = Recorder(askAt: nil)
        try run(never, onRequest: true)
        #expect(never.reports.isEmpty && never.questions > 0)

        let asked = Recorder(askAt: 40)
        try run(asked, onRequest: true)
        // Asked after 40 hand-outs of 64 KiB (2.5 MiB, past 1 MiB of hole): the first two
        // requests (2 MiB at 1 MiB, 2 MiB at 3 MiB) in one report, then the rest one by one.
        let total: UInt64 = (5 << 20) + (100 << 10)
        #expect(asked.reports.map(\.done) == [4 << 20, 5 << 20, total])
        #expect(asked.questions == 40)
    }
}
