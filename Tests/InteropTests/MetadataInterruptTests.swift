import Foundation
import Glibc
import Testing
import TestSupport

/// SIGINT/SIGTERM and a full disk during `resize`, `snapshot -c/-d/-a` and `commit`, as
/// SignalTests/RebaseInterruptTests and FaultTests do for convert and rebase.
///
/// Signals: strace delivers SIGINT as simg enters its N-th fdatasync, for every N until a run
/// completes. simg must die of SIGINT (as convert and rebase do), print one line naming the
/// image that says truthfully whether it changed (or nothing, when the signal came after the
/// last sync: the command had finished), and leave an image `qemu-img check` does not call
/// corrupt, with the old or the new content. The signal at each sync reaches the points just
/// before and after each metadata switch, which random moments rarely hit.
///
/// Full disk: `prlimit --fsize` (EFBIG) at a few limits, and a 4 MiB tmpfs (ENOSPC): exit 1,
/// one message naming the file and the offset, the image not corrupt and as before.
@Suite struct MetadataInterruptTests {
    // MARK: - SIGINT at every sync

    @Test(arguments: ["create", "delete", "apply"])
    func snapshotInterruptedAtEverySync(_ action: String) throws {
        let dir = try TempDir()
        let pristine = try metaSnapshotImage(dir)
        let old = try crashGuestBytes(pristine, dir)
        // The expected result of the action, made by qemu-img.
        let done = dir.file("done.qcow2")
        try copySparse(pristine, done)
        let args: [String] = action == "create" ? ["-c", "new"] : action == "delete" ? ["-d", "s1"] : ["-a", "s1"]
        _ = try runOK("qemu-img", ["snapshot"] + args + [done])
        let new = try crashGuestBytes(done, dir)
        let newList = try metaSnapshotNames(done), oldList = try metaSnapshotNames(pristine)
        try metaSweepSyncs(dir, pristine: pristine, arguments: ["snapshot"] + args, image: "x.qcow2") { image, stderr in
            let content = try crashGuestBytes(image, dir)
            let names = try metaSnapshotNames(image)
            if stderr.contains("is unchanged (the snapshot was not") {
                #expect(content == old && names == oldList, "\(action): said unchanged, but is not")
            } else {
                // Said changed, or finished: the new state.
                #expect(content == new && names == newList, "\(action): \(stderr)")
            }
        }
    }

    /// A grow that needs a larger L1 table (4 KiB clusters: 2 MiB per L2 table), the same with
    /// falloc (also a new refcount table and blocks) and a shrink that frees tables: the old
    /// size and content, or the new.
    @Test(arguments: [["32M"], ["--preallocation=falloc", "32M"], ["--shrink", "4M"]])
    func resizeInterruptedAtEverySync(_ tail: [String]) throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", pristine, "16M")
        var writes: [String] = []
        for k in 0..<8 { writes += ["-c", "write -P \(k + 1) \(k * 2)M 64k"] }
        _ = try runOK("qemu-io", writes + [pristine])
        let old = try crashGuestBytes(pristine, dir)
        let newSize = tail.contains("--shrink") ? 4 << 20 : 32 << 20
        let options = Array(tail.dropLast())
        try metaSweepSyncs(dir, pristine: pristine, arguments: ["resize"] + options, image: "x.qcow2",
                           trailing: [tail.last!]) { image, stderr in
            let size = try metaVirtualSize(image)
            let content = try crashGuestBytes(image, dir)
            let common = min(old.count, newSize)
            #expect(Array(content.prefix(common)) == Array(old.prefix(common)), "content changed: \(stderr)")
            if stderr.contains("was not resized") {
                #expect(size == old.count, "said not resized: \(stderr)")
            } else {
                #expect(size == newSize, "\(stderr)")
                #expect(!content.dropFirst(common).contains { $0 != 0 }, "the new area is not zeros")
            }
        }
    }

    /// The top reads the same at every point; the base holds the top's data once simg says it
    /// was committed.
    @Test func commitInterruptedAtEverySync() throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), pristineTop = dir.file("pristine.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", base, "16M")
        _ = try qemuIO("-c", "write -P 5 0 8M", base)
        let baseCopy = dir.file("base-pristine.qcow2")
        try copySparse(base, baseCopy)
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", pristineTop)
        _ = try qemuIO("-c", "write -P 9 2M 3M", "-c", "write -z 12M 1M", pristineTop)
        let view = try crashGuestBytes(pristineTop, dir)
        try metaSweepSyncs(dir, pristine: pristineTop, arguments: ["commit"], image: "x.qcow2", prepare: {
            try? FileManager.default.removeItem(atPath: base)
            try copySparse(baseCopy, base)
        }) { image, stderr in
            try signalExpectNotCorrupt(base)
            #expect(try crashGuestBytes(image, dir) == view, "the top's view changed: \(stderr)")
            if !stderr.contains("was not committed") {
                #expect(try crashGuestBytes(base, dir) == view, "said committed, but the base differs: \(stderr)")
            }
        }
    }

    /// SIGTERM while a rate-limited commit copies: it stops within a second, naming the top.
    @Test func commitStopsOnSIGTERM() throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", base, "64M")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        var writes: [String] = []
        for k in 0..<32 { writes += ["-c", "write -P \(k + 1) \(k * 2)M 1M"] }
        _ = try runOK("qemu-io", writes + [top])
        let view = try crashGuestBytes(top, dir)
        // 4 MiB/s over 32 MiB: several seconds of copying between sleeps.
        let child = try SignalChild(simgBinary, ["commit", "-r", "4M", top], in: dir)
        defer { child.reap() }
        try child.waitUntil("the base grows by 2 MiB") { signalFileSize(base) > 3 << 20 }
        let stop = try child.interrupt(SIGTERM)
        try signalExpectDeath(stop, by: SIGTERM, child)
        #expect(child.stderr.contains("simg: interrupted by SIGTERM; '\(top)' was not committed (it reads as before)"), "\(child.stderr)")
        try signalExpectNotCorrupt(top)
        try signalExpectNotCorrupt(base)
        #expect(try crashGuestBytes(top, dir) == view)
    }

    // MARK: - Full disk

    /// Limits at the file's size and a little past it: the new metadata (snapshot, L1 table,
    /// preallocated clusters, the base's data) does not fit.
    @Test func fileSizeLimitDuringMetadataChanges() throws {
        let dir = try TempDir()
        let pristine = try metaSnapshotImage(dir)
        let old = try crashGuestBytes(pristine, dir)
        let size = signalFileSize(pristine)
        let cases: [[String]] = [["snapshot", "-c", "new"], ["snapshot", "-d", "s1"], ["snapshot", "-a", "s1"],
                                 ["resize", "--preallocation=metadata", "IMAGE", "+64M"]]
        for arguments in cases {
            for extra: UInt64 in [0, 65536] {
                let image = dir.file("x.qcow2")
                try? FileManager.default.removeItem(atPath: image)
                try copySparse(pristine, image)
                let args = arguments.contains("IMAGE") ? arguments.map { $0 == "IMAGE" ? image : $0 } : arguments + [image]
                let r = try run("prlimit", ["--fsize=\(size + extra)", simgBinary] + args)
                faultExpectWriteError(r, file: image, reason: "File too large")
                try signalExpectNotCorrupt(image)
                #expect(try crashGuestBytes(image, dir) == old, "\(arguments) +\(extra): content changed")
                #expect(try metaVirtualSize(image) == old.count, "\(arguments) +\(extra)")
                #expect(try metaSnapshotNames(image) == metaSnapshotNames(pristine), "\(arguments) +\(extra)")
            }
        }
    }

    @Test func fileSizeLimitDuringCommit() throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", base, "32M")
        _ = try qemuIO("-c", "write -P 5 0 1M", base)
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        _ = try qemuIO("-c", "write -P 9 4M 8M", top)
        let view = try crashGuestBytes(top, dir)
        let r = try run("prlimit", ["--fsize=\(signalFileSize(base) + (1 << 20))", simgBinary, "commit", top])
        faultExpectWriteError(r, file: base, reason: "File too large")
        #expect(r.stderr.contains("Could not write to the base image at byte "), "\(r.stderr)")
        try signalExpectNotCorrupt(base)
        try signalExpectNotCorrupt(top)
        #expect(try crashGuestBytes(top, dir) == view)
    }

    /// A 4 MiB file system filled up: a snapshot's new metadata and a commit's data do not fit.
    @Test(.enabled(if: faultTmpfsPermitted, "mount -t tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)"))
    func fullFileSystemDuringSnapshotAndCommit() throws {
        let dir = try TempDir()
        let mount = try FaultTmpfs(dir)
        defer { mount.unmount() }
        let image = "\(mount.path)/x.qcow2", base = "\(mount.path)/base.qcow2", top = dir.file("top.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", image, "8M")
        _ = try qemuIO("-c", "write -P 3 0 2M", image)
        _ = try qemuImg("create", "-q", "-f", "qcow2", base, "8M")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        _ = try qemuIO("-c", "write -P 9 1M 2M", top)
        let old = try crashGuestBytes(image, dir), view = try crashGuestBytes(top, dir)
        // The rest of the file system (dd stops at ENOSPC).
        _ = try? run("dd", ["if=/dev/zero", "of=\(mount.path)/fill", "bs=64k", "status=none"])

        let s = try simg(["snapshot", "-c", "s1", image])
        faultExpectWriteError(s, file: image, reason: "No space left on device")
        #expect(s.stderr.hasPrefix("simg: Could not create snapshot 's1': "), "\(s.stderr)")
        try signalExpectNotCorrupt(image)
        #expect(try metaSnapshotNames(image).isEmpty)
        #expect(try crashGuestBytes(image, dir) == old)

        let c = try simg(["commit", top])
        faultExpectWriteError(c, file: base, reason: "No space left on device")
        #expect(c.stderr.contains("Could not write to the base image at byte "), "\(c.stderr)")
        try signalExpectNotCorrupt(base)
        try signalExpectNotCorrupt(top)
        #expect(try crashGuestBytes(top, dir) == view)
    }
}

// MARK: - Helpers (prefixed: every test file shares one module)

/// 4 MiB with data, a snapshot s1, then different data: snapshot actions change content and
/// the table.
func metaSnapshotImage(_ dir: TempDir) throws -> String {
    let image = dir.file("pristine.qcow2")
    _ = try qemuImg("create", "-q", "-f", "qcow2", image, "4M")
    _ = try qemuIO("-c", "write -P 1 0 2M", image)
    _ = try qemuImg("snapshot", "-c", "s1", image)
    _ = try qemuIO("-c", "write -P 2 1M 2M", image)
    return image
}

func metaSnapshotNames(_ image: String) throws -> [String] {
    let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
    return (info["snapshots"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
}

func metaVirtualSize(_ image: String) throws -> Int {
    let info = try jsonObject(try qemuImg("info", "--output=json", image).stdout)
    return (info["virtual-size"] as? NSNumber)?.intValue ?? -1
}

/// Runs `simg ARGUMENTS IMAGE TRAILING` on a fresh copy of `pristine` with SIGINT delivered at
/// the 1st, 2nd, ... fdatasync, until a run gets through all its syncs. Each run: death by
/// SIGINT, stderr empty or one line naming the image, `qemu-img check` not corrupt, then
/// `verify(image, stderr)`. At least one run must have been interrupted part-way.
func metaSweepSyncs(_ dir: TempDir, pristine: String, arguments: [String], image name: String,
                    trailing: [String] = [], prepare: () throws -> Void = {},
                    verify: (String, String) throws -> Void) throws {
    guard let strace = which("strace") else { throw ToolError.missing("strace") }
    let image = dir.file(name)
    var interrupted = 0
    for sync in 1...40 {
        try? FileManager.default.removeItem(atPath: image)
        try copySparse(pristine, image)
        try prepare()
        let child = try SignalChild(strace, ["-f", "-o", "/dev/null", "-e", "trace=fdatasync",
                                             "-e", "inject=fdatasync:signal=SIGINT:when=\(sync)",
                                             simgBinary] + arguments + [image] + trailing, in: dir)
        defer { child.reap() }
        try child.waitUntil("simg exits", timeout: 60, exitIsExpected: true) { false }
        let stderr = child.stderr
        let context = "\(arguments) sync \(sync)"
        if child.terminatingSignal != SIGINT && child.exitCode == 0 {
            // No sync left to interrupt: the run completed untouched.
            #expect(stderr.isEmpty, "\(context): \(stderr)")
            try verify(image, stderr)
            #expect(interrupted > 0, "\(arguments): no sync was interrupted part-way")
            return
        }
        #expect(child.terminatingSignal == SIGINT, "\(context): status \(child.status ?? -1): \(stderr)")
        if !stderr.isEmpty {
            interrupted += 1
            #expect(stderr.hasPrefix("simg: interrupted by SIGINT; '\(image)' "), "\(context): \(stderr)")
            #expect(stderr.split(separator: "\n").count == 1, "\(context): \(stderr)")
        }
        try signalExpectNotCorrupt(image)
        try verify(image, stderr)
    }
    Issue.record("\(arguments): every one of 40 syncs was interrupted")
}
