import Foundation

/// A fresh folder of its own for one test, removed when the value goes away.
///
/// Shared by every test target (each used to carry its own copy). Where the folder lives is a
/// choice, not a detail: some tests need a real disk file system.
public final class TempDir {
    /// Where the folder is made.
    public enum Place {
        /// The system temporary folder (`$TMPDIR`, else /tmp), named by a UUID.
        case systemTemp
        /// /var/tmp, named by mkdtemp: ext4 here, so O_DIRECT, holes and fallocate all work
        /// (a tmpfs /tmp refuses O_DIRECT).
        case varTmp
        /// /dev/shm when it is writable, else the system temporary folder; named by a UUID.
        /// tmpfs takes files up to 2^63 bytes, which the fuzz replay needs (see its tests).
        case sharedMemoryIfWritable
    }

    public let path: String

    public init(prefix: String = "simg-test", in place: Place = .systemTemp) throws {
        switch place {
        case .systemTemp, .sharedMemoryIfWritable:
            let shm = "/dev/shm"
            let root = place == .sharedMemoryIfWritable && access(shm, W_OK) == 0
                ? URL(fileURLWithPath: shm) : FileManager.default.temporaryDirectory
            let base = root.appendingPathComponent("\(prefix)-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: base, withIntermediateDirectories: true)
            path = base.path
        case .varTmp:
            var template = Array("/var/tmp/\(prefix)-XXXXXX".utf8CString)
            let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
            guard made != nil else { throw TempDirError(errno: errno, path: "/var/tmp") }
            path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    deinit { remove() }

    /// Removes the folder now (for tests that remove it in a `defer`, which also keeps the value
    /// alive to the end of the scope).
    public func remove() { try? FileManager.default.removeItem(atPath: path) }

    /// The path of `name` inside the folder (nothing is created).
    public func file(_ name: String) -> String { "\(path)/\(name)" }
}

/// mkdtemp failed; names the folder and the system's reason.
public struct TempDirError: Error, CustomStringConvertible {
    public let errno: Int32
    public let path: String
    public var description: String { "cannot make a folder in \(path): \(String(cString: strerror(errno)))" }
}
