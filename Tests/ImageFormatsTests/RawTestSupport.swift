import DiskIO
import Foundation
import ImageFormats
import Testing

/// Size and allocated bytes of a file, via stat.
func rawStat(_ path: String) throws -> (size: UInt64, allocated: UInt64) {
    var st = stat()
    guard stat(path, &st) == 0 else { throw IOError(code: errno, operation: .stat, path: path) }
    return (UInt64(st.st_size), UInt64(st.st_blocks) * 512)
}
