import Foundation
import Testing
import TestSupport

/// Shared helpers for tests that drive the built `simg` binary and QEMU's tools.

struct ProcessResult {
    var status: Int32
    var stdout: String
    var stderr: String
    var stdoutData: Data
}

enum ToolError: Error, CustomStringConvertible {
    case missing(String)
    case failed(String, ProcessResult)
    var description: String {
        switch self {
        case .missing(let tool): return "\(tool) is not installed (make test installs qemu-utils)"
        case .failed(let cmd, let r): return "\(cmd) exited \(r.status): \(r.stderr)"
        }
    }
}

/// Runs a program (looked up in PATH unless it is a path) and captures its output.
@discardableResult
func run(_ program: String, _ arguments: [String], input: Data? = nil,
         in directory: String? = nil) throws -> ProcessResult {
    let process = Process()
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    if program.contains("/") {
        process.executableURL = URL(fileURLWithPath: program)
    } else {
        guard let found = which(program) else { throw ToolError.missing(program) }
        process.executableURL = URL(fileURLWithPath: found)
    }
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    if let input {
        let inPipe = Pipe()
        process.standardInput = inPipe
        try process.run()
        inPipe.fileHandleForWriting.write(input)
        try inPipe.fileHandleForWriting.close()
    } else {
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }
    // Read both pipes before waiting so a chatty child cannot block on a full pipe.
    let errBox = DataBox()
    let errThread = Thread { errBox.data = err.fileHandleForReading.readDataToEndOfFile() }
    errThread.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    while !errThread.isFinished { usleep(1000) }
    let errData = errBox.data
    return ProcessResult(status: process.terminationStatus,
                         stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData, as: UTF8.self),
                         stdoutData: outData)
}

/// Holds what the stderr reader thread collected; read only after that thread finished.
private final class DataBox: @unchecked Sendable {
    var data = Data()
}

/// Runs a program and fails the test (by throwing) unless it exits 0.
@discardableResult
func runOK(_ program: String, _ arguments: [String], in directory: String? = nil) throws -> ProcessResult {
    let r = try run(program, arguments, in: directory)
    if r.status != 0 { throw ToolError.failed(([program] + arguments).joined(separator: " "), r) }
    return r
}

func simg(_ arguments: String...) throws -> ProcessResult { try run(simgBinary, arguments) }
func simg(_ arguments: [String]) throws -> ProcessResult { try run(simgBinary, arguments) }

/// Runs qemu-img; a missing qemu-img is a failure, never a skip.
@discardableResult
func qemuImg(_ arguments: String...) throws -> ProcessResult { try runOK("qemu-img", arguments) }
@discardableResult
func qemuIO(_ arguments: String...) throws -> ProcessResult { try runOK("qemu-io", arguments) }

/// The same, run in `directory` (for relative file names, as a user would type them).
func simg(in directory: String, _ arguments: String...) throws -> ProcessResult {
    try run(simgBinary, arguments, in: directory)
}
@discardableResult
func qemuImg(in directory: String, _ arguments: String...) throws -> ProcessResult {
    try runOK("qemu-img", arguments, in: directory)
}
@discardableResult
func qemuIO(in directory: String, _ arguments: String...) throws -> ProcessResult {
    try runOK("qemu-io", arguments, in: directory)
}
/// Runs qemu-img without requiring success (to compare its errors with simg's); a missing
/// qemu-img still throws.
func qemuImgResult(in directory: String? = nil, _ arguments: [String]) throws -> ProcessResult {
    try run("qemu-img", arguments, in: directory)
}

func which(_ tool: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    for dir in path.split(separator: ":") + ["/usr/bin", "/usr/sbin"] {
        let candidate = "\(dir)/\(tool)"
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    return nil
}

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
