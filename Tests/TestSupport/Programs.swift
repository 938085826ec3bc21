import Foundation

// Running the programs tests drive (the built simg, QEMU's qemu-img and qemu-io, strace) and
// capturing what they print: the one runner every test target uses.

/// What a program did: exit status, stdout (as text and bytes), stderr.
public struct ProcessResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var stdoutData: Data

    public init(status: Int32, stdout: String, stderr: String, stdoutData: Data) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.stdoutData = stdoutData
    }
}

/// A program is missing or failed; says which and what it wrote.
public enum ToolError: Error, CustomStringConvertible {
    case missing(String)
    case failed(String, ProcessResult)
    public var description: String {
        switch self {
        case .missing(let tool): return "\(tool) is not installed (make test installs qemu-utils)"
        case .failed(let cmd, let r): return "\(cmd) exited \(r.status): \(r.stderr)"
        }
    }
}

/// Runs a program (looked up in PATH unless it is a path) and captures its output.
@discardableResult
public func run(_ program: String, _ arguments: [String], input: Data? = nil,
                in directory: String? = nil) throws -> ProcessResult {
    let process = Process()
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    process.executableURL = try executableURL(program)
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
public func runOK(_ program: String, _ arguments: [String], in directory: String? = nil) throws -> ProcessResult {
    let r = try run(program, arguments, in: directory)
    if r.status != 0 { throw ToolError.failed(([program] + arguments).joined(separator: " "), r) }
    return r
}

/// Starts a program (a path) with stdin, stdout and stderr on /dev/null and returns at once,
/// for tests that signal or kill it while it runs.
public func startProgram(_ program: String, _ arguments: [String]) throws -> Process {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: program)
    process.arguments = arguments
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    return process
}

/// The program to run: `program` itself if it is a path, else where PATH has it (a missing
/// program throws `ToolError.missing`).
public func executableURL(_ program: String) throws -> URL {
    if program.contains("/") { return URL(fileURLWithPath: program) }
    guard let found = which(program) else { throw ToolError.missing(program) }
    return URL(fileURLWithPath: found)
}

/// Where `tool` is in PATH (or /usr/bin, /usr/sbin), if anywhere.
public func which(_ tool: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    for dir in path.split(separator: ":") + ["/usr/bin", "/usr/sbin"] {
        let candidate = "\(dir)/\(tool)"
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    return nil
}

/// The built simg, capturing its output.
public func simg(_ arguments: String...) throws -> ProcessResult { try run(simgBinary, arguments) }
public func simg(_ arguments: [String]) throws -> ProcessResult { try run(simgBinary, arguments) }

/// Runs qemu-img; a missing qemu-img is a failure, never a skip.
@discardableResult
public func qemuImg(_ arguments: String...) throws -> ProcessResult { try runOK("qemu-img", arguments) }
@discardableResult
public func qemuIO(_ arguments: String...) throws -> ProcessResult { try runOK("qemu-io", arguments) }

/// The same, run in `directory` (for relative file names, as a user would type them).
public func simg(in directory: String, _ arguments: String...) throws -> ProcessResult {
    try run(simgBinary, arguments, in: directory)
}
@discardableResult
public func qemuImg(in directory: String, _ arguments: String...) throws -> ProcessResult {
    try runOK("qemu-img", arguments, in: directory)
}
@discardableResult
public func qemuIO(in directory: String, _ arguments: String...) throws -> ProcessResult {
    try runOK("qemu-io", arguments, in: directory)
}
/// Runs qemu-img without requiring success (to compare its errors with simg's); a missing
/// qemu-img still throws.
public func qemuImgResult(in directory: String? = nil, _ arguments: [String]) throws -> ProcessResult {
    try run("qemu-img", arguments, in: directory)
}

/// posix_spawn refused to start a program: its error number and strerror's words for it.
public struct SpawnFailure: Error {
    public var code: Int32
    public var reason: String { String(cString: strerror(code)) }
}

/// Starts `program` with posix_spawn, stdin on /dev/null, stdout and stderr into the files
/// `stdout` and `stderr` (created or truncated; a chatty child never blocks on a full pipe),
/// and returns its pid for the caller to signal and reap: no Foundation machinery between the
/// test and the child (Foundation's Process crashed under the parallel load of the hostile
/// image suites). `searchPath` looks `program` up in PATH (posix_spawnp); `attributes` are
/// the caller's (a signal mask, signal defaults).
public func spawnWithFiles(_ program: String, _ arguments: [String], stdout: String, stderr: String,
                           attributes: UnsafePointer<posix_spawnattr_t>? = nil,
                           searchPath: Bool = false) throws(SpawnFailure) -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    // Sound: each strdup'd string lives until the defer frees it, after posix_spawn returned
    // (the child has its own copy by then); the array ends in nil as execve requires.
    let argv: [UnsafeMutablePointer<CChar>?] = ([program] + arguments).map { strdup($0) } + [nil]
    defer { for arg in argv { free(arg) } }
    var pid: pid_t = 0
    // Sound: `actions` and `attributes` outlive the call; argv as above.
    let rc = searchPath ? posix_spawnp(&pid, program, &actions, attributes, argv, environ)
                        : posix_spawn(&pid, program, &actions, attributes, argv, environ)
    guard rc == 0 else { throw SpawnFailure(code: rc) }
    return pid
}
