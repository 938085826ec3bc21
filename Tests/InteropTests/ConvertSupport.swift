import Foundation
import Testing
import TestSupport

/// Helpers for the convert interop tests (owned by the convert work).

/// Bytes allocated on disk for `path` (st_blocks * 512).
func convertAllocatedBytes(_ path: String) throws -> UInt64 { try fileSizes(path).allocated }

/// Writes `count` bytes of a deterministic, non-zero, non-repeating pattern at `offset`
/// (growing the file as needed).
func convertWritePattern(_ path: String, offset: UInt64, count: Int, seed: UInt8) throws {
    try writeBytes(nonZeroBytes(count, seed: seed, salt: 1), to: path, at: offset)
}

/// Sets the file's size (sparse growth or truncation).
func convertTruncate(_ path: String, to size: UInt64) throws {
    guard truncate(path, off_t(size)) == 0 else { throw ToolError.missing(path) }
}

/// The `--stats` JSON object simg printed on stderr (the last line that is an object).
func convertStats(_ result: ProcessResult) throws -> [String: Any] {
    guard let line = result.stderr.split(separator: "\n").last(where: { $0.hasPrefix("{") }) else {
        throw ToolError.missing("--stats JSON in: \(result.stderr)")
    }
    return try jsonObject(String(line))
}

func convertInt(_ stats: [String: Any], _ key: String) -> Int {
    (stats[key] as? NSNumber)?.intValue ?? -1
}

/// Runs `simg convert ARGS` and fails (throws) unless it exits 0.
@discardableResult
func simgConvertOK(_ arguments: [String]) throws -> ProcessResult {
    let r = try simg(["convert"] + arguments)
    if r.status != 0 { throw ToolError.failed("simg convert " + arguments.joined(separator: " "), r) }
    return r
}

/// Converts `source` to raw with simg (extra `arguments`, e.g. cache modes) and with qemu-img,
/// and checks the outputs are byte-identical and simg's is no less sparse (allowing 64 KiB).
func expectRawConvertMatchesQemu(_ source: String, in dir: TempDir, _ arguments: [String] = [],
                                 sourceArguments: [String] = [],
                                 sourceLocation: SourceLocation = #_sourceLocation) throws {
    let name = UUID().uuidString
    let ours = dir.file("simg-\(name).raw")
    let theirs = dir.file("qemu-\(name).raw")
    try simgConvertOK(arguments + sourceArguments + ["-O", "raw", source, ours])
    _ = try runOK("qemu-img", ["convert"] + sourceArguments + ["-O", "raw", source, theirs])
    #expect(try filesEqual(ours, theirs), "simg convert \(arguments) of \(source) differs from qemu-img's",
            sourceLocation: sourceLocation)
    let a = try convertAllocatedBytes(ours), b = try convertAllocatedBytes(theirs)
    #expect(a <= b + 65536, "simg's output of \(source) allocates \(a) bytes, qemu-img's \(b)",
            sourceLocation: sourceLocation)
    try? FileManager.default.removeItem(atPath: ours)
    try? FileManager.default.removeItem(atPath: theirs)
}

/// Converts `source` to qcow2 with simg (`arguments` e.g. -o options) and checks the result
/// with `qemu-img check` and `qemu-img compare` against the source.
func expectQCOW2ConvertChecks(_ source: String, in dir: TempDir, _ arguments: [String] = [],
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
    let output = dir.file("simg-\(UUID().uuidString).qcow2")
    try simgConvertOK(arguments + ["-O", "qcow2", source, output])
    let check = try run("qemu-img", ["check", output])
    #expect(check.status == 0, "qemu-img check of \(output) (\(arguments)): \(check.stdout) \(check.stderr)",
            sourceLocation: sourceLocation)
    let compare = try run("qemu-img", ["compare", source, output])
    #expect(compare.status == 0, "qemu-img compare \(source) with simg's qcow2 (\(arguments)): \(compare.stdout) \(compare.stderr)",
            sourceLocation: sourceLocation)
    try? FileManager.default.removeItem(atPath: output)
}
