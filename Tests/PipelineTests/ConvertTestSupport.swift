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

// The made-up source image, FakeImage, is TestSupport's.

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
    func asyncDestination(forWriteAt offset: UInt64, length: Int) -> (endpoint: any BlockEndpoint, offset: UInt64)? { nil }
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
