import Foundation
import Testing
import TestSupport

/// Shared helpers for tests that drive the built `simg` binary and QEMU's tools.

// The program runner (run, runOK, simg, qemuImg, qemuIO, qemuImgResult, which) is
// TestSupport's (Programs.swift).

/// Parses JSON output into a dictionary for field-by-field comparison.
func jsonObject(_ text: String) throws -> [String: Any] {
    let value = try JSONSerialization.jsonObject(with: Data(text.utf8))
    guard let dict = value as? [String: Any] else { throw ToolError.missing("JSON object in: \(text)") }
    return dict
}

/// True when the two files have identical contents. Ranges that are holes in both files are
/// skipped (SEEK_DATA), so comparing two sparse multi-GiB images reads only their data; the rest
/// is compared in 1 MiB pieces, never loaded whole.
func filesEqual(_ a: String, _ b: String) throws -> Bool {
    let fa = open(a, O_RDONLY), fb = open(b, O_RDONLY)
    defer { if fa >= 0 { close(fa) }; if fb >= 0 { close(fb) } }
    guard fa >= 0, fb >= 0 else { throw ToolError.missing("\(a) or \(b)") }
    let sizeA = lseek(fa, 0, SEEK_END), sizeB = lseek(fb, 0, SEEK_END)
    guard sizeA == sizeB else { return false }
    /// Where the next data at or after `offset` is; the end when there is none (ENXIO).
    func nextData(_ fd: Int32, _ offset: off_t) -> off_t {
        let found = lseek(fd, offset, 3)  // SEEK_DATA: Glibc's module hides it without _GNU_SOURCE
        return found < 0 ? sizeA : found
    }
    var bufA = [UInt8](repeating: 0, count: 1 << 20), bufB = bufA
    var position: off_t = 0
    while position < sizeA {
        let start = min(nextData(fa, position), nextData(fb, position))
        if start >= sizeA { return true }
        let count = Int(min(off_t(1 << 20), sizeA - start))
        let readA = bufA.withUnsafeMutableBytes { pread(fa, $0.baseAddress, count, start) }
        let readB = bufB.withUnsafeMutableBytes { pread(fb, $0.baseAddress, count, start) }
        guard readA == count, readB == count else { throw ToolError.missing("\(count) bytes at \(start) of \(a) and \(b)") }
        // memcmp: an element-wise compare in this unoptimized test target costs seconds per GiB.
        // Sound: both buffers hold 1 MiB (never empty, so baseAddress is set) and count <= 1 MiB.
        let same = bufA.withUnsafeBytes { pa in bufB.withUnsafeBytes { pb in memcmp(pa.baseAddress!, pb.baseAddress!, count) == 0 } }
        if !same { return false }
        position = start + off_t(count)
    }
    return true
}

/// simg's stderr in qemu-img's words: its "simg: " prefix and help hint.
func interopQemuWords(_ text: String) -> String {
    text.split(separator: "\n", omittingEmptySubsequences: false).map { line in
        var line = String(line)
        if line.hasPrefix("simg: ") { line = "qemu-img: " + line.dropFirst(6) }
        return line.replacingOccurrences(of: "Try 'simg --help'", with: "Try 'qemu-img --help'")
    }.joined(separator: "\n")
}

/// `qemu-img info --output=json` fields that do not depend on where the file is or how sparse
/// the copy came out, each as sorted JSON text, for comparing two tools' results.
func interopComparableInfo(_ path: String) throws -> [String: String] {
    let json = try jsonObject(try qemuImg("info", "--output=json", path).stdout)
    var out: [String: String] = [:]
    for (key, value) in json where !["filename", "full-backing-filename", "actual-size", "dirty-flag"].contains(key) {
        let data = try JSONSerialization.data(withJSONObject: ["v": value], options: [.sortedKeys])
        out[key] = String(decoding: data, as: UTF8.self)
    }
    return out
}
