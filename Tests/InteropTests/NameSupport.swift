import Foundation
import Testing
import TestSupport

/// What a shell script printed, as bytes: file names that are not UTF-8 must be compared
/// exactly, which Strings decoded with repair cannot do.
struct ShellResult {
    var status: Int32
    var stdout: Data
    var stderr: Data
    var text: String { String(decoding: stdout, as: UTF8.self) }
    var errorText: String { String(decoding: stderr, as: UTF8.self) }
}

/// Runs `script` with bash in `directory`; `$T` is the tool under test. Bash turns `$'\xff'`
/// into the byte, so scripts can name files no Swift String argument could reach.
func shell(_ script: String, tool: String, in directory: String) throws -> ShellResult {
    let out = directory + "/.stdout", err = directory + "/.stderr"
    let full = "T='\(tool)'\n{ \(script)\n} >'\(out)' 2>'\(err)'"
    let r = try run("/bin/bash", ["-c", full], in: directory)
    let result = ShellResult(status: r.status,
                             stdout: FileManager.default.contents(atPath: out) ?? Data(),
                             stderr: FileManager.default.contents(atPath: err) ?? Data())
    try? FileManager.default.removeItem(atPath: out)
    try? FileManager.default.removeItem(atPath: err)
    return result
}

/// The same script with qemu-img and with simg, each in its own fresh folder after `prepare`
/// (run with qemu-img as `$T`) made the same files in both.
func shellBoth(_ script: String, prepare: String = "") throws
    -> (theirs: ShellResult, ours: ShellResult, theirDir: TempDir, ourDir: TempDir) {
    let theirDir = try TempDir(), ourDir = try TempDir()
    for dir in [theirDir, ourDir] where !prepare.isEmpty {
        let made = try shell(prepare, tool: "qemu-img", in: dir.path)
        if made.status != 0 { throw ToolError.missing("prepare failed: \(made.errorText)") }
    }
    let theirs = try shell(script, tool: "qemu-img", in: theirDir.path)
    let ours = try shell(script, tool: simgBinary, in: ourDir.path)
    return (theirs, ours, theirDir, ourDir)
}

/// qemu-img's bytes with its program name replaced by simg's, at the start of each line.
func qemuToSimg(_ data: Data) -> Data {
    var out = Data()
    let prefix = Data("qemu-img: ".utf8), ours = Data("simg: ".utf8)
    var lineStart = true
    var i = data.startIndex
    while i < data.endIndex {
        if lineStart && data[i...].starts(with: prefix) {
            out.append(ours)
            i += prefix.count
            lineStart = false
            continue
        }
        lineStart = data[i] == 0x0A
        out.append(data[i])
        i += 1
    }
    return out
}

/// Whether a file of exactly this byte name exists in `directory` (bash's `test -e`).
func byteNameExists(_ name: String, in directory: String) throws -> Bool {
    try run("/bin/bash", ["-c", "test -e \(name)"], in: directory).status == 0
}
