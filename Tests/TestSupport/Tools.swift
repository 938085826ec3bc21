import Foundation

// Finding the programs tests drive (the built simg, QEMU's qemu-img); Programs.swift runs them.

/// The repository root, found from this file's path (Tests/TestSupport/Tools.swift).
public let repositoryRoot: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// The simg binary under test: $SIMG if set, else the debug build beside the tests.
public let simgBinary: String = {
    if let path = ProcessInfo.processInfo.environment["SIMG"], !path.isEmpty { return path }
    // The test bundle lives in the same build folder as the executable.
    let bundleDir = Bundle.main.bundleURL
    for candidate in [bundleDir.appendingPathComponent("simg"),
                      bundleDir.deletingLastPathComponent().appendingPathComponent("simg"),
                      repositoryRoot.appendingPathComponent(".build/debug/simg")] {
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate.path }
    }
    return repositoryRoot.appendingPathComponent(".build/debug/simg").path
}()

/// qemu-img is missing or failed; says which command and what it wrote.
public struct QemuImgFailure: Error, CustomStringConvertible {
    public var description: String

    public init(description: String) { self.description = description }
}

/// Runs qemu-img (which must be installed: a missing tool fails the test) and returns its
/// stdout; a nonzero exit throws, with what it wrote.
@discardableResult
public func qemuImgOutput(_ arguments: [String]) throws -> String {
    let candidates = ["/usr/bin/qemu-img", "/usr/local/bin/qemu-img", "/bin/qemu-img"]
    guard let tool = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw QemuImgFailure(description: "qemu-img is not installed (make test installs qemu-utils)")
    }
    let result = try run(tool, arguments)
    guard result.status == 0 else {
        throw QemuImgFailure(description: "qemu-img \(arguments.joined(separator: " ")) exited \(result.status): "
                             + result.stdout + result.stderr)
    }
    return result.stdout
}

/// A file's size and the bytes allocated for it on disk (st_blocks * 512), via stat.
public func fileSizes(_ path: String) throws -> (size: UInt64, allocated: UInt64) {
    var st = stat()
    guard stat(path, &st) == 0 else { throw TestFileError(path: path, reason: "stat failed: \(String(cString: strerror(errno)))") }
    return (UInt64(st.st_size), UInt64(st.st_blocks) * 512)
}
