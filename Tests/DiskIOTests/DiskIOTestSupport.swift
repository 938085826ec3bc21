import DiskIO
import Foundation
import Testing

/// Opens `path` with O_DIRECT, failing the test with a clear message if the file system refuses.
func openDirect(_ path: String, access: DiskFile.Access = .readWrite) throws -> DiskFile {
    do {
        return try DiskFile.open(path, access: access, cache: .none)
    } catch let error as IOError where error.code == EINVAL {
        Issue.record("the file system holding \(path) refuses O_DIRECT: \(error)")
        throw error
    }
}

/// A small deterministic generator, so failures reproduce.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return state ^ (state >> 29)
    }
}
