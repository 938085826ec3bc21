import DiskIO
import Foundation
import ImageFormats
@testable import Pipeline
import TestSupport

/// Deterministic non-zero bytes (the pipeline tests' salt of the shared generator).
func pipelinePattern(_ count: Int, seed: UInt8) -> [UInt8] { nonZeroBytes(count, seed: seed, salt: 7) }

/// Creates a sparse file of `size` bytes with `pieces` written into it.
func pipelineFile(_ path: String, size: UInt64, pieces: [(offset: UInt64, bytes: [UInt8])]) throws {
    let file = try DiskFile.create(path)
    for piece in pieces { try file.write(piece.bytes, at: piece.offset) }
    try file.truncate(to: size)
    file.close()
}

/// A made-up image: block status from a list of extents, data from a closure.
final class FakeImage: DiskImage {
    let path: String
    var format: ImageFormat { .qcow2 }
    let virtualSize: UInt64
    var isWritable: Bool { false }
    var backing: (any DiskImage)?
    let dataFile: DiskFile
    var file: DiskFile { dataFile }
    var extents: [Extent]
    let content: (UInt64) -> UInt8
    var blockStatusCalls = 0
    /// When set, block status answers with this length (to test bad answers).
    var reportedLength: UInt64?

    init(path: String, size: UInt64, dataFile: DiskFile, extents: [Extent], backing: (any DiskImage)? = nil,
         content: @escaping (UInt64) -> UInt8 = { _ in 0 }) {
        self.path = path
        virtualSize = size
        self.dataFile = dataFile
        self.extents = extents
        self.backing = backing
        self.content = content
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        for i in 0..<buffer.count { buffer[i] = content(offset + UInt64(i)) }
    }
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {}
    func writeZeroes(at offset: UInt64, length: UInt64) throws {}
    func discard(at offset: UInt64, length: UInt64) throws {}
    func blockStatus(at offset: UInt64, length: UInt64) throws -> Extent {
        blockStatusCalls += 1
        guard let extent = extents.first(where: { $0.offset <= offset && offset < $0.end }) else {
            throw ImageError(path: path, message: "no extent at \(offset)")
        }
        let delta = offset - extent.offset
        var kind = extent.kind
        if case .data(let host?) = kind { kind = .data(hostOffset: host + delta) }
        return Extent(offset: offset, length: reportedLength ?? min(extent.length - delta, length), kind: kind)
    }
    func flush() throws {}
    func close() throws {}
    func info() throws -> ImageInfo { ImageInfo(filename: path, format: "qcow2", virtualSize: virtualSize) }
}

/// A target in memory that records what the pipeline asked of it.
final class MemoryTarget: ConvertTarget {
    let path = "memory"
    let virtualSize: UInt64
    let writeGranularity: Int
    var isDirect: Bool { false }
    var writesAsynchronously: Bool { false }
    let startsZeroed: Bool
    var bytes: [UInt8]
    var writes: [(offset: UInt64, length: Int)] = []
    var zeroes: [(offset: UInt64, length: UInt64)] = []
    var finished = false

    init(size: UInt64, granularity: Int = 1, startsZeroed: Bool = true, fill: UInt8 = 0) {
        virtualSize = size
        writeGranularity = granularity
        self.startsZeroed = startsZeroed
        bytes = [UInt8](repeating: fill, count: Int(size))
    }

    func readsAsZero(at offset: UInt64, length: UInt64) -> Bool { startsZeroed }
    func asyncDestination(forWriteAt offset: UInt64, length: Int) -> (file: DiskFile, offset: UInt64)? { nil }
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        writes.append((offset, data.count))
        for i in 0..<data.count { bytes[Int(offset) + i] = data[i] }
    }
    func writeZeroes(at offset: UInt64, length: UInt64) throws {
        zeroes.append((offset, length))
        for i in 0..<Int(length) { bytes[Int(offset) + i] = 0 }
    }
    func finish() throws { finished = true }
    func abandon() {}
}
