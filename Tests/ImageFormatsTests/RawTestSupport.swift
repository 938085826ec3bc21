import DiskIO
import Foundation
import ImageFormats
import Testing

struct RawToolFailure: Error, CustomStringConvertible {
    var description: String
}

/// Runs qemu-img (which must be installed: a missing tool fails the test) and returns stdout.
@discardableResult
func rawQemuImg(_ arguments: [String]) throws -> String {
    let candidates = ["/usr/bin/qemu-img", "/usr/local/bin/qemu-img", "/bin/qemu-img"]
    guard let tool = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw RawToolFailure(description: "qemu-img is not installed (make test installs qemu-utils)")
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: tool)
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw RawToolFailure(description: "qemu-img \(arguments.joined(separator: " ")) exited \(process.terminationStatus): "
                             + String(decoding: errData, as: UTF8.self))
    }
    return String(decoding: outData, as: UTF8.self)
}

/// Size and allocated bytes of a file, via stat.
func rawStat(_ path: String) throws -> (size: UInt64, allocated: UInt64) {
    var st = stat()
    guard stat(path, &st) == 0 else { throw IOError(code: errno, operation: .stat, path: path) }
    return (UInt64(st.st_size), UInt64(st.st_blocks) * 512)
}
