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
