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

/// True when the two files have identical contents (compared in chunks, not loaded whole).
func filesEqual(_ a: String, _ b: String) throws -> Bool {
    guard let fa = FileHandle(forReadingAtPath: a), let fb = FileHandle(forReadingAtPath: b) else {
        throw ToolError.missing("\(a) or \(b)")
    }
    defer { try? fa.close(); try? fb.close() }
    while true {
        let da = fa.readData(ofLength: 1 << 20), db = fb.readData(ofLength: 1 << 20)
        if da != db { return false }
        if da.isEmpty { return true }
    }
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
