import Foundation
import Glibc
import Testing
import TestSupport

/// Helpers for the device tests: nodes made with mknod in the test's own folder, loop devices
/// over files of random data, and running qemu-img and simg side by side on twin devices.
///
/// Every command is given a node in a TempDir, never /dev/loopN or /dev/null themselves: if
/// simg ever regressed into deleting its target, the test would see its own node gone (and
/// fail) instead of the system losing a device node.

/// A device test could not set up what it needs (the test then fails, never skips).
struct DeviceSetupError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The kind and device number of a node, as lstat(2) sees it (a link is not followed).
struct NodeState: Equatable, CustomStringConvertible {
    var type: mode_t
    var rdev: UInt64
    var description: String {
        let kind = type == S_IFBLK ? "block" : type == S_IFCHR ? "char" : type == S_IFLNK ? "link"
            : type == S_IFREG ? "regular" : "mode \(type)"
        return "\(kind) \(rdev >> 8):\(rdev & 0xff)"
    }
}

/// nil when nothing is there any more.
func nodeState(_ path: String) -> NodeState? {
    var status = stat()
    guard lstat(path, &status) == 0 else { return nil }
    return NodeState(type: status.st_mode & S_IFMT, rdev: UInt64(status.st_rdev))
}

/// Linux's dev_t encoding (glibc's makedev, which Swift does not import).
func deviceNumber(major: UInt64, minor: UInt64) -> UInt64 {
    ((major & 0xfffff000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffffff00) << 12) | (minor & 0xff)
}

/// Makes a device node (`type` S_IFCHR or S_IFBLK) at `path`; throws when mknod fails (the
/// test then fails: CI runs as root).
func makeNode(_ path: String, type: mode_t, rdev: UInt64) throws {
    guard mknod(path, type | 0o600, dev_t(rdev)) == 0 else {
        throw DeviceSetupError("mknod \(path): \(String(cString: strerror(errno)))")
    }
}

/// A character node for the device /dev/null is (1:3): writes vanish, reads are empty.
func makeNullNode(_ path: String) throws {
    try makeNode(path, type: S_IFCHR, rdev: deviceNumber(major: 1, minor: 3))
}

/// `count` random bytes.
func randomBytes(_ count: Int) -> Data {
    var generator = SystemRandomNumberGenerator()
    var bytes = [UInt8](repeating: 0, count: count)
    for i in stride(from: 0, to: count, by: 8) {
        let word = generator.next()
        for k in 0..<min(8, count - i) { bytes[i + k] = UInt8(truncatingIfNeeded: word >> (8 * UInt64(k))) }
    }
    return Data(bytes)
}

/// The first `count` bytes of `path` (fewer at its end).
func readPrefix(_ path: String, _ count: Int, at offset: UInt64 = 0) throws -> Data {
    guard let handle = FileHandle(forReadingAtPath: path) else { throw DeviceSetupError("cannot read \(path)") }
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    return try handle.read(upToCount: count) ?? Data()
}

/// A loop device over `backing`, used through a block node of our own at `node`. Detach it
/// with `detach()` in a defer (deinit does too, as a last resort).
final class LoopDevice {
    /// /dev/loopN: only ever given to losetup -d.
    let device: String
    /// The node the tests use.
    let node: String
    private var attached = true

    init(backing: String, node: String) throws {
        let r = try run("losetup", ["-f", "--show", backing])
        guard r.status == 0 else { throw ToolError.failed("losetup -f --show \(backing)", r) }
        let device = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        var status = stat()
        do {
            guard stat(device, &status) == 0, status.st_mode & S_IFMT == S_IFBLK else {
                throw DeviceSetupError("\(device) is not a block device")
            }
            try makeNode(node, type: S_IFBLK, rdev: UInt64(status.st_rdev))
        } catch {
            _ = try? run("losetup", ["-d", device])
            throw error
        }
        self.device = device
        self.node = node
    }

    var state: NodeState? { nodeState(node) }

    func detach() {
        guard attached else { return }
        attached = false
        let r = try? run("losetup", ["-d", device])
        if r?.status != 0 { Issue.record("losetup -d \(device) failed: \(r?.stderr ?? "not run")") }
    }

    deinit { detach() }
}

/// Two loop devices over files holding the same random bytes, each reached as `dev` in its own
/// folder (`q/` for qemu-img, `s/` for simg), so that both tools print the same names.
final class DeviceTwins {
    let dir: TempDir
    let qemu: LoopDevice
    let ours: LoopDevice
    /// What both devices held before the test.
    let initial: Data

    init(size: Int, in dir: TempDir) throws {
        self.dir = dir
        initial = randomBytes(size)
        for side in ["q", "s"] {
            try FileManager.default.createDirectory(atPath: dir.file(side), withIntermediateDirectories: true)
            try initial.write(to: URL(fileURLWithPath: dir.file("\(side).back")))
        }
        qemu = try LoopDevice(backing: dir.file("q.back"), node: dir.file("q/dev"))
        do {
            ours = try LoopDevice(backing: dir.file("s.back"), node: dir.file("s/dev"))
        } catch {
            qemu.detach()
            throw error
        }
    }

    func detach() {
        qemu.detach()
        ours.detach()
    }

    /// Runs qemu-img in q/ and simg in s/ with the same arguments ("dev" names each one's device).
    func both(_ arguments: [String]) throws -> (ours: ProcessResult, theirs: ProcessResult) {
        let theirs = try qemuImgResult(in: dir.file("q"), arguments)
        let ours = try run(simgBinary, arguments, in: dir.file("s"))
        return (ours, theirs)
    }

    /// The whole contents of both devices, read through their nodes.
    func contents() throws -> (ours: Data, theirs: Data) {
        (try readPrefix(ours.node, initial.count), try readPrefix(qemu.node, initial.count))
    }
}

/// Whether two byte strings are equal. Megabytes of device contents are compared through this
/// rather than `#expect(a == b)`, whose failure report diffs the two collections (quadratic:
/// a failing 4 MiB comparison never finishes).
func sameBytes(_ a: Data, _ b: Data) -> Bool { a == b }

/// Expects simg's result to be qemu-img's: status, stdout, stderr after the program name.
func expectSameOutcome(_ r: (ours: ProcessResult, theirs: ProcessResult), _ what: String,
                       sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(r.ours.status == r.theirs.status, "\(what): status", sourceLocation: sourceLocation)
    #expect(r.ours.stdout == r.theirs.stdout, "\(what): stdout", sourceLocation: sourceLocation)
    #expect(r.ours.stderr == qemuToSimg(r.theirs.stderr), "\(what): stderr", sourceLocation: sourceLocation)
}

/// A 2 MiB qcow2 source: data at 0 and 1 MiB, a cluster of zeros written as data at 512 KiB,
/// a zero cluster at 1.5 MiB, the rest unallocated. Its raw image is written beside it.
func makeDeviceTestSource(in dir: TempDir, name: String = "src.qcow2") throws -> (qcow2: String, raw: String) {
    let path = dir.file(name)
    try qemuImg("create", "-q", "-f", "qcow2", path, "2M")
    try qemuIO("-c", "write -P 0xab 0 64k", "-c", "write -P 0 512k 64k", "-c", "write -P 0xcd 1M 64k",
               "-c", "write -z 1536k 64k", path)
    let raw = path + ".raw"
    try qemuImg("convert", "-O", "raw", path, raw)
    return (path, raw)
}
