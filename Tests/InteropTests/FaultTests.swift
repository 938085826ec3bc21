import Foundation
import Testing
import TestSupport

/// A target that fills up or a write that fails half-way (issue 6): `convert`, `create` and
/// `rebase` stop with the error, naming the file and the byte offset, exit 1, leave the sources
/// byte-identical, and leave no qcow2 image that `qemu-img check` calls corrupt.
///
/// A file size limit (`prlimit --fsize`, which makes write(2) fail with EFBIG once simg ignores
/// SIGXFSZ) always runs; a full file system (a 4 MiB tmpfs, ENOSPC) needs mount(2), so those
/// tests are disabled where mounting is not permitted.
@Suite("Faults")
struct FaultTests {
    /// 5 MiB limit: the 20 MiB sources cannot fit. A multiple of 4096, so that O_DIRECT writes
    /// crossing it fail with EFBIG (an unaligned limit cuts the write to an unaligned length,
    /// which the kernel refuses with EINVAL first; qemu-img reports the same EINVAL then).
    static let limit = 5 << 20

    // MARK: - File size limit (EFBIG)

    @Test(arguments: [[], ["-t", "none"], ["-c"]])
    func convertToQCOW2PastTheFileSizeLimit(_ extra: [String]) throws {
        let dir = try TempDir()
        let source = try faultSource(dir)
        let before = try signalHash(source)
        let out = dir.file("out.qcow2")
        let r = try faultLimited(["convert", "-O", "qcow2"] + extra + [source, out])
        faultExpectWriteError(r, file: out, reason: "File too large")
        #expect(r.stderr.contains("error while writing at byte "), "\(r.stderr)")
        try signalExpectNotCorrupt(out)
        #expect(try signalHash(source) == before)
    }

    /// Limits that cut the output at different places: inside the metadata create writes (the
    /// new image is removed), the first data cluster, an L2 table, later data runs.
    @Test(arguments: [[], ["-t", "none"], ["-c"]])
    func convertToQCOW2FailsCleanlyAtAnyLimit(_ extra: [String]) throws {
        let dir = try TempDir()
        let source = try faultSource(dir)
        let before = try signalHash(source)
        for limit in [131_072, 262_144, 393_216, 1 << 20, 2_162_688, 4_259_840, 8_454_144] {
            let out = dir.file("out-\(limit).qcow2")
            let r = try run("prlimit", ["--fsize=\(limit)", simgBinary, "convert", "-O", "qcow2"] + extra + [source, out])
            faultExpectWriteError(r, file: out, reason: "File too large")
            if FileManager.default.fileExists(atPath: out) {
                try signalExpectNotCorrupt(out)
            } else {
                // Failed while being created: removed, as qemu-img does.
                #expect(r.stderr.contains("Could not write the new image"), "\(limit): \(r.stderr)")
            }
        }
        #expect(try signalHash(source) == before)
    }

    @Test func convertToRawPastTheFileSizeLimit() throws {
        let dir = try TempDir()
        let source = try faultSource(dir)
        let before = try signalHash(source)
        let out = dir.file("out.raw")
        // The raw target is sized first: that already fails, as in qemu-img.
        let r = try faultLimited(["convert", "-O", "raw", source, out])
        faultExpectWriteError(r, file: out, reason: "File too large")
        #expect(try signalHash(source) == before)
    }

    @Test(arguments: [("raw", "full"), ("raw", "falloc"), ("qcow2", "full"), ("qcow2", "falloc")])
    func createWithPreallocationPastTheFileSizeLimit(_ format: String, _ mode: String) throws {
        let dir = try TempDir()
        let image = dir.file("new.\(format)")
        let r = try faultLimited(["create", "-q", "-f", format, "-o", "preallocation=\(mode)", image, "20M"])
        faultExpectWriteError(r, file: image, reason: "File too large")
        faultExpectNoSpaceKept(image)
    }

    @Test func rebaseCopyPastTheFileSizeLimit() throws {
        let dir = try TempDir()
        let chain = try faultRebaseChain(dir, overlayDir: dir.path)
        let overlaySize = signalFileSize(chain.overlay)
        // Room for a few clusters of the 16 MiB the rebase has to copy in.
        let r = try run("prlimit", ["--fsize=\(overlaySize + (1 << 20))", simgBinary,
                                    "rebase", "-b", chain.newBase, "-F", "qcow2", chain.overlay])
        faultExpectWriteError(r, file: chain.overlay, reason: "File too large")
        try faultExpectRebaseUndone(chain)
    }

    /// Limits that stop the copy at its first data cluster, inside a run, at a new L2 table,
    /// later: each time the overlay is left on its old base, reading as before.
    @Test func rebaseFailsCleanlyAtAnyLimit() throws {
        let dir = try TempDir()
        let chain = try faultRebaseChain(dir, overlayDir: dir.path)
        let pristine = dir.file("pristine.qcow2")
        try copySparse(chain.overlay, pristine)
        let size = signalFileSize(pristine)
        for extra: UInt64 in [0, 4096, 65536, 200_000, 1 << 20, 4 << 20] {
            try? FileManager.default.removeItem(atPath: chain.overlay)
            try copySparse(pristine, chain.overlay)
            let r = try run("prlimit", ["--fsize=\(size + extra)", simgBinary,
                                        "rebase", "-b", chain.newBase, "-F", "qcow2", chain.overlay])
            faultExpectWriteError(r, file: chain.overlay, reason: "File too large")
            #expect(r.stderr.contains("Error while writing to COW image at byte "), "\(r.stderr)")
            try faultExpectRebaseUndone(chain)
        }
    }

    // MARK: - No I/O thread (pthread_create fails)

    /// A stack limit of 32 TiB: glibc sizes a new thread's stack from RLIMIT_STACK, the mmap
    /// fails, pthread_create returns EAGAIN. (RLIMIT_NPROC would not do: it spares root.)
    /// convert between buffered files uses the thread pool: an error naming the target, exit 1,
    /// no trap (before: "Fatal error: cannot create an I/O thread", SIGILL).
    @Test(arguments: ["raw", "qcow2"])
    func convertWithoutIOThreads(_ format: String) throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try Data(repeating: 0x5A, count: 1 << 20).write(to: URL(fileURLWithPath: source))
        let out = dir.file("out.\(format)")
        let r = try run("prlimit", ["--stack=\(1 << 45)", simgBinary, "convert", "-f", "raw", "-O", format, source, out])
        #expect(r.status == 1, "\(r.status): \(r.stderr)")
        #expect(r.stderr == "simg: '\(out)': cannot start the copy: Could not create an I/O thread: "
                + "Resource temporarily unavailable\n", "\(r.stderr)")
    }

    /// `convert -c`: the compression threads are the first ones it needs.
    @Test func compressingConvertWithoutThreads() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try Data(repeating: 0x5A, count: 1 << 20).write(to: URL(fileURLWithPath: source))
        let out = dir.file("out.qcow2")
        let r = try run("prlimit", ["--stack=\(1 << 45)", simgBinary, "convert", "-c", "-f", "raw", "-O", "qcow2", source, out])
        #expect(r.status == 1, "\(r.status): \(r.stderr)")
        #expect(r.stderr == "simg: Could not open '\(out)': Could not create a compression thread: "
                + "Resource temporarily unavailable\n", "\(r.stderr)")
    }

    // MARK: - Full file system (ENOSPC)

    @Test(.enabled(if: faultTmpfsPermitted, "mount -t tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)"),
          arguments: [["-O", "qcow2"], ["-O", "qcow2", "-t", "none"], ["-O", "raw"], ["-O", "raw", "-t", "none"]])
    func convertOntoAFullFileSystem(_ options: [String]) throws {
        let dir = try TempDir()
        let source = try faultSource(dir)
        let before = try signalHash(source)
        let mount = try FaultTmpfs(dir)
        defer { mount.unmount() }
        let out = "\(mount.path)/out.img"
        let r = try simg(["convert"] + options + [source, out])
        faultExpectWriteError(r, file: out, reason: "No space left on device")
        #expect(r.stderr.contains("error while writing at byte "), "\(r.stderr)")
        if options.contains("qcow2") { try signalExpectNotCorrupt(out) }
        #expect(try signalHash(source) == before)
    }

    @Test(.enabled(if: faultTmpfsPermitted, "mount -t tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)"),
          arguments: [("raw", "full"), ("raw", "falloc"), ("qcow2", "full"), ("qcow2", "falloc")])
    func createOnAFullFileSystem(_ format: String, _ mode: String) throws {
        let dir = try TempDir()
        let mount = try FaultTmpfs(dir)
        defer { mount.unmount() }
        let image = "\(mount.path)/new.\(format)"
        let r = try simg(["create", "-q", "-f", format, "-o", "preallocation=\(mode)", image, "20M"])
        faultExpectWriteError(r, file: image, reason: "No space left on device")
        faultExpectNoSpaceKept(image)
    }

    @Test(.enabled(if: faultTmpfsPermitted, "mount -t tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)"))
    func rebaseCopyOntoAFullFileSystem() throws {
        let dir = try TempDir()
        let mount = try FaultTmpfs(dir)
        defer { mount.unmount() }
        let chain = try faultRebaseChain(dir, overlayDir: mount.path)
        let r = try simg(["rebase", "-b", chain.newBase, "-F", "qcow2", chain.overlay])
        faultExpectWriteError(r, file: chain.overlay, reason: "No space left on device")
        try faultExpectRebaseUndone(chain)
    }
}

// MARK: - Helpers (prefixed: every test file shares one module)

/// 20 MiB of random data (which -c cannot shrink below the limit).
func faultSource(_ dir: TempDir) throws -> String {
    let path = dir.file("src.raw")
    _ = try runOK("dd", ["if=/dev/urandom", "of=\(path)", "bs=1M", "count=20", "status=none"])
    return path
}

/// simg under `prlimit --fsize` (FaultTests.limit).
func faultLimited(_ arguments: [String]) throws -> ProcessResult {
    try run("prlimit", ["--fsize=\(FaultTests.limit)", simgBinary] + arguments)
}

/// Exit 1, one error naming the file (quoted, as IOError does) and a byte offset, with the
/// system's reason.
func faultExpectWriteError(_ r: ProcessResult, file: String, reason: String) {
    #expect(r.status == 1, "exit \(r.status): \(r.stderr)")
    #expect(r.stderr.hasPrefix("simg: "), "\(r.stderr)")
    // A copy names the failing guest byte once ("error while writing at byte N: Could not
    // write 'FILE': ..."); creating and rebasing name the host offset of the failed write.
    if r.stderr.contains("error while writing at byte ") {
        #expect(r.stderr.contains("Could not write '\(file)': "), "\(r.stderr)")
        #expect(!r.stderr.contains(" at offset "), "\(r.stderr)")
    } else {
        #expect(r.stderr.contains("'\(file)' at offset "), "\(r.stderr)")
    }
    #expect(r.stderr.contains(reason), "\(r.stderr)")
}

/// A failed create keeps no space: the qcow2 file is removed, the raw file left empty (both
/// as qemu-img does).
func faultExpectNoSpaceKept(_ image: String) {
    if image.hasSuffix(".qcow2") {
        #expect(!FileManager.default.fileExists(atPath: image))
    } else {
        #expect(signalAllocatedBytes(image) == 0 && signalFileSize(image) == 0)
    }
}

struct FaultRebaseChain {
    var oldBase: String
    var newBase: String
    var overlay: String
    /// qemu-img's raw conversion of the overlay before the rebase.
    var expected: String
    var hashes: [String: String]
}

/// old.qcow2 (16 MiB of data) <- ov.qcow2 (1 MiB of its own); new.qcow2 empty, so a safe rebase
/// onto it must copy 16 MiB into the overlay.
func faultRebaseChain(_ dir: TempDir, overlayDir: String) throws -> FaultRebaseChain {
    let oldBase = dir.file("old.qcow2"), newBase = dir.file("new.qcow2"), overlay = "\(overlayDir)/ov.qcow2"
    _ = try qemuImg("create", "-q", "-f", "qcow2", oldBase, "32M")
    _ = try qemuIO("-c", "write -P 0x11 0 16M", oldBase)
    _ = try qemuImg("create", "-q", "-f", "qcow2", newBase, "32M")
    _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", oldBase, "-F", "qcow2", overlay)
    _ = try qemuIO("-c", "write -P 0x22 4M 1M", overlay)
    // What the overlay reads now, to compare after the failure.
    let expected = dir.file("expected.raw")
    _ = try qemuImg("convert", "-O", "raw", overlay, expected)
    var hashes: [String: String] = [:]
    for path in [oldBase, newBase] { hashes[path] = try signalHash(path) }
    return FaultRebaseChain(oldBase: oldBase, newBase: newBase, overlay: overlay, expected: expected, hashes: hashes)
}

/// After a failed rebase: the overlay is not corrupt, still names its old backing file, reads
/// as before, and neither base changed.
func faultExpectRebaseUndone(_ chain: FaultRebaseChain) throws {
    try signalExpectNotCorrupt(chain.overlay)
    let info = try jsonObject(try qemuImg("info", "--output=json", chain.overlay).stdout)
    #expect(info["backing-filename"] as? String == chain.oldBase)
    let compare = try qemuImgResult(["compare", "-F", "raw", chain.overlay, chain.expected])
    #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
    for (path, hash) in chain.hashes { #expect(try signalHash(path) == hash, "\(path) changed") }
}

/// A 4 MiB tmpfs mounted on a folder inside `dir`.
final class FaultTmpfs {
    let path: String
    private var mounted = true

    init(_ dir: TempDir) throws {
        path = dir.file("small-fs")
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        _ = try runOK("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", path])
    }

    func unmount() {
        guard mounted else { return }
        mounted = false
        _ = try? run("umount", [path])
    }

    deinit { unmount() }
}

/// Whether this process may mount a tmpfs (root, or CAP_SYS_ADMIN, outside a locked-down
/// container). Tried once.
let faultTmpfsPermitted: Bool = {
    guard let dir = try? TempDir() else { return false }
    guard let mount = try? FaultTmpfs(dir) else { return false }
    mount.unmount()
    return true
}()
